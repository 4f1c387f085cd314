"""What real models revealed: context limits checked up front, ``--template auto``, and the
chat-messages path for trainers that apply the chat template themselves (TRL GKD/SFT)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

import srdata
from srdata.demo.tiny import build_tiny_model
from srdata.cli import main
from srdata.steps.context import check_pair_lengths, check_token_limits, model_max_positions
from srdata.curriculum.reader import add_chat_messages, curriculum_training_set

from .conftest import corpus, write_jsonl

# A ChatML-like template for a tiny tokenizer (its BPE splits the markers into ordinary tokens).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FAST = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4", "-q"]


@pytest.fixture(scope="module")
def short_gpt2(tmp_path_factory):
    """GPT-2 with 64 learned positions: past them its forward pass raises IndexError."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2-64", corpus(), arch="gpt2", max_positions=64)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "llama-chat", corpus(), arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def rows(n: int = 6) -> list[dict]:
    return [{"instruction": f"Repeat the word number {i}.", "input": "ctx" if i % 2 else "", "output": f"word {i}"} for i in range(n)]


# ------------------------------------------------------------------ context length
def test_limits_that_cannot_fit_name_the_setting():
    with pytest.raises(ValueError, match=r"lower --max-new-tokens to at most 768"):
        check_token_limits(1024, max_prompt_tokens=256, max_new_tokens=2000, max_reference_tokens=256)
    with pytest.raises(ValueError, match=r"lower --max-reference-tokens to at most 24"):
        check_token_limits(64, max_prompt_tokens=40, max_new_tokens=8, max_reference_tokens=100)
    with pytest.raises(ValueError, match=r"lower --max-prompt-tokens below 64"):
        check_token_limits(64, max_prompt_tokens=64, max_new_tokens=1, max_reference_tokens=1)
    check_token_limits(1024, max_prompt_tokens=256, max_new_tokens=768, max_reference_tokens=None)  # fits exactly
    check_token_limits(None, max_prompt_tokens=10**6, max_new_tokens=10**6, max_reference_tokens=None)  # no limit known
    with pytest.raises(ValueError, match=r"row 12 \(9 tokens\)"):
        check_pair_lengths([[1] * 4, [1] * 5], [[2] * 2, [2] * 4], [11, 12], max_positions=8)


def test_model_positions_are_read_from_the_config(short_gpt2, tiny_llama):
    assert model_max_positions(str(short_gpt2)) == 64  # GPT-2: n_positions
    assert model_max_positions(str(tiny_llama)) == 1024  # Llama: max_position_embeddings
    assert model_max_positions(str(tiny_llama), 300) == 300  # vLLM's --max-model-len lowers it


def test_too_many_new_tokens_fail_before_any_work(short_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["score", str(data), "--model", str(short_gpt2), "--output", str(out),
                                       "--max-prompt-tokens", "32", *FAST[:-3], "--max-new-tokens", "2000"])
    assert result.exit_code != 0
    assert "64 positions" in result.output and "lower --max-new-tokens to at most 32" in result.output
    assert "Traceback" not in result.output and not (out / "shards").exists()


def test_uncapped_reference_over_the_context_names_the_row(short_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [*rows(3), {"instruction": "Long.", "input": "", "output": "word " * 80}])
    with pytest.raises(ValueError, match=r"row 3 \(\d+ tokens\).*--max-reference-tokens"):
        srdata.score(dataset=str(data), model=str(short_gpt2), output=str(tmp_path / "run"), progress=False,
                     device="cpu", max_new_tokens=4, max_prompt_tokens=32, max_reference_tokens=None, template="raw")
    # the same rows with references capped to what fits score fine (and flag the cut)
    result = srdata.score(dataset=str(data), model=str(short_gpt2), output=str(tmp_path / "capped"), progress=False,
                          device="cpu", max_new_tokens=4, max_prompt_tokens=32, max_reference_tokens=32, template="raw")
    assert result.to_polars()["reference_truncated"].to_list() == [False, False, False, True]


# ------------------------------------------------------------------ --template auto
def test_auto_template_is_chat_when_the_tokenizer_has_one(chat_llama, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(3))
    for model, expected, why in ((chat_llama, "chat", "has a chat template"), (tiny_llama, "alpaca", "has no chat template")):
        out = tmp_path / expected
        result = CliRunner().invoke(main, ["score", str(data), "--model", str(model), "--output", str(out), *FAST[:-1]])
        assert result.exit_code == 0, result.output
        assert f"template: {expected} (auto: the tokenizer {why}" in result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["prompt"]["template"] == expected and "template" not in manifest  # recorded once, resolved
    chat_prompt = srdata.score(dataset=str(data), model=str(chat_llama), output=str(tmp_path / "chat"), progress=False,
                               device="cpu", dtype="float32", max_new_tokens=4).to_polars()["prompt_text"][0]
    assert chat_prompt.startswith("<|user|>\n") and chat_prompt.endswith("<|assistant|>\n")
    # an explicit template wins over auto
    explicit = CliRunner().invoke(main, ["score", str(data), "--model", str(chat_llama), "--output", str(tmp_path / "alp"),
                                         "--template", "alpaca", *FAST[:-1]])
    assert explicit.exit_code == 0 and "template: alpaca\n" in explicit.output


def test_run_recorded_before_auto_resumes(tiny_llama, tmp_path):
    """A manifest written before ``auto`` existed recorded template None; the same rendering resumes."""
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    kw = dict(dataset=str(data), model=str(tiny_llama), output=str(tmp_path / "run"), progress=False, device="cpu",
              dtype="float32", max_new_tokens=4, shard_size=2)
    srdata.score(**kw)
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["settings"]["prompt"]["template"] = None
    manifest["shards"][1]["done"] = False
    manifest_path.write_text(json.dumps(manifest))
    assert srdata.score(**kw).manifest["resumed"]


# --------------------------------------------------- trainers that template themselves
def test_chat_messages_rebuild_exactly_the_scored_prompt(chat_llama, tmp_path):
    """The README's GKD path: messages through the chat template give back prompt_text, not a double template."""
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    run = tmp_path / "run"
    srdata.score(dataset=str(data), model=str(chat_llama), output=str(run), progress=False, device="cpu",
                 dtype="float32", max_new_tokens=4)
    srdata.export_curriculum(run)
    stages = srdata.load_curriculum(run / "curriculum")
    train, stage_of_row = curriculum_training_set(stages)
    train = add_chat_messages(train, run / "curriculum")
    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    assert len(train) == len(stage_of_row) == 6
    for row in train:
        *history, answer = row["messages"]
        assert answer == {"role": "assistant", "content": row["output"]}
        assert tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False) == row["prompt_text"]
        whole = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert whole == row["prompt_text"].removesuffix("<|assistant|>\n") + f"<|assistant|>\n{row['output']}</s>\n"
        # what the old snippet did: prompt_text wrapped in a second template
        wrapped = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt_text"]}], add_generation_prompt=True, tokenize=False)
        assert wrapped != row["prompt_text"]


def test_chat_truncation_keeps_the_template_text_on_both_sides(chat_llama, tmp_path):
    """A real-model finding: cutting rendered ids dropped the assistant header (right) or the user header (left)."""
    from srdata.steps.prompts import chat_affixes
    from srdata.steps.tokenize import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    head, tail = chat_affixes(tokenizer)
    assert (head, tail) == ("<|user|>\n", "</s>\n<|assistant|>\n")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "word " * 200 + "END"}], add_generation_prompt=True, tokenize=False)
    head_ids, tail_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (head, tail))
    for side in ("left", "right"):
        pair = encode_pairs(tokenizer, [text], ["ok"], max_prompt_tokens=40, truncation_side=side, add_special_tokens=False,
                            keep=(head, tail))[0]
        assert pair.prompt_truncated and len(pair.prompt_ids) == 40
        assert pair.prompt_ids[: len(head_ids)] == head_ids and pair.prompt_ids[-len(tail_ids):] == tail_ids
        kept = tokenizer.decode(pair.prompt_ids[len(head_ids) : -len(tail_ids)])
        assert kept.strip().endswith("END") == (side == "left") and "word" in kept
    # a prompt that fits is encoded exactly as its whole string
    short = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    pair = encode_pairs(tokenizer, [short], ["ok"], add_special_tokens=False, keep=(head, tail))[0]
    assert pair.prompt_ids == tokenizer(short, add_special_tokens=False)["input_ids"] and not pair.prompt_truncated
    with pytest.raises(ValueError, match="chat template's own text; raise --max-prompt-tokens"):
        encode_pairs(tokenizer, [text], ["ok"], max_prompt_tokens=len(head_ids) + len(tail_ids), add_special_tokens=False, keep=(head, tail))


def test_generation_stops_at_every_end_id_the_model_lists(tiny_llama, tmp_path):
    """Instruct models list several end ids (Llama-3: <|eot_id|>, <|end_of_text|>); the tokenizer knows one."""
    import shutil

    from srdata.backends import Generation
    from srdata.config import build_config
    from srdata.steps.context import model_stop_ids
    from srdata.steps.dataset import ColumnMapping
    from srdata.shard import score_shard
    from srdata.steps.prompts import resolved_config
    from srdata.run.folder import Shard

    model = tmp_path / "llama"
    shutil.copytree(tiny_llama, model)
    config_path = model / "generation_config.json"
    generation = json.loads(config_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    generation["eos_token_id"] = [7, tokenizer.eos_token_id, 9]
    config_path.write_text(json.dumps(generation))
    assert model_stop_ids(str(model)) == (7, tokenizer.eos_token_id, 9)

    seen = {}

    class Spy:
        def score_and_generate(self, prompts, references, params, progress=None):
            seen["stop"] = params.stop_token_ids
            return [1.0] * len(prompts), [Generation([5], "x", "stop")] * len(prompts)

    config = build_config({"dataset": "unused", "model": str(model), "output": str(tmp_path / "run")})
    rows = {"instruction": ["Say hi."], "output": ["hi"]}
    score_shard(rows, Shard(0, 0, 1), tokenizer, Spy(), resolved_config(config, ColumnMapping("instruction", "output"), "alpaca"))
    assert seen["stop"] == (tokenizer.eos_token_id, 7, 9)  # the reference's EOS first, then the model's others
