"""`srdata score` end to end on tiny offline models."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import datasets
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

import srdata
from srdata.cli import main
from srdata.pipeline import InvalidRowError, score
from tests._encode import encode_pair

from .conftest import write_jsonl

FAST = dict(max_new_tokens=6, shard_size=5, device="cpu", dtype="float32")
CONTRACT = {
    "srd_id": pl.Int64, "prompt_text": pl.String, "student_output": pl.String, "finish_reason": pl.String,
    "prompt_tokens": pl.Int64, "reference_tokens": pl.Int64, "output_tokens": pl.Int64,
    "prompt_truncated": pl.Boolean, "rouge_l": pl.Float64, "ce_loss": pl.Float64,
    "rank_rouge_l": pl.Int64, "rank_ce_loss": pl.Int64, "rrf_score": pl.Float64, "difficulty_rank": pl.Int64,
}


def run(dataset, model, out, **kw):
    return score(dataset=str(dataset), model=str(model), output=str(out), progress=False, **{**FAST, **kw})


def test_contract_columns_values_and_ranks(tiny_llama, instruct_file, tmp_path):
    result = run(instruct_file, tiny_llama, tmp_path / "run")
    df = result.to_polars()
    source = [json.loads(line) for line in instruct_file.read_text().splitlines()]

    for name, dtype in CONTRACT.items():
        assert df.schema[name] == dtype, name
    assert df["srd_id"].to_list() == list(range(len(source)))
    assert df["instruction"].to_list() == [r["instruction"] for r in source]  # original columns kept, aligned
    assert sorted(df["difficulty_rank"].to_list()) == list(range(1, len(source) + 1))

    # ROUGE-L identical to rouge-score; CE equal to a plain single-example forward pass.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for row in df.iter_rows(named=True):
        assert row["rouge_l"] == scorer.score(row["output"], row["student_output"])["rougeL"].fmeasure
        pair = encode_pair(tok, row["prompt_text"], row["output"])
        ids = torch.tensor([pair.prompt_ids + pair.reference_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(pair.prompt_ids) - 1
        nll = -logprobs[start : start + len(pair.reference_ids)].gather(1, torch.tensor(pair.reference_ids)[:, None]).mean()
        assert row["ce_loss"] == pytest.approx(float(nll), rel=1e-3)
        assert row["reference_tokens"] == len(pair.reference_ids)
        assert row["prompt_tokens"] == len(pair.prompt_ids)
        assert row["prompt_text"].startswith("Below is an instruction")

    # Ranks agree with the values (ties broken by srd_id).
    by_rouge = df.sort(["rouge_l", "srd_id"], descending=[True, False])["srd_id"].to_list()
    assert df.sort("rank_rouge_l")["srd_id"].to_list() == by_rouge
    assert df.sort("rank_ce_loss")["srd_id"].to_list() == df.sort(["ce_loss", "srd_id"])["srd_id"].to_list()
    rrf = 1 / (60 + df["rank_rouge_l"]) + 1 / (60 + df["rank_ce_loss"])
    assert (df["rrf_score"] - rrf).abs().max() < 1e-12
    assert df.sort("difficulty_rank")["rrf_score"].is_sorted(descending=True)

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows_scored"] == len(source)
    assert manifest["columns"]["prompt_column"] == "instruction" and manifest["columns"]["detected"]
    assert manifest["timings"]["rows_per_second"] > 0 and manifest["versions"]["torch"]
    assert manifest["identity"]["model"]["fingerprint"]


def test_student_output_equals_plain_greedy_generate(tiny_gpt2, instruct_file, tmp_path):
    df = run(instruct_file, tiny_gpt2, tmp_path / "run", max_new_tokens=10).to_polars()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    for row in df.iter_rows(named=True):
        ids = encode_pair(tok, row["prompt_text"], "").prompt_ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert row["student_output"] == tok.decode(new, skip_special_tokens=True)
        assert row["output_tokens"] == len(new)


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_gpt2, tmp_path, shared_data_dir):
    data = tmp_path / "t0.parquet"
    pl.read_parquet(shared_data_dir / "t0-train.parquet").head(40).write_parquet(data)
    args = [sys.executable, "-m", "srdata.cli", "score", str(data), "--model", str(tiny_gpt2), "--device", "cpu",
            "--max-new-tokens", "4", "--shard-size", "4", "--max-prompt-tokens", "64", "--quiet", "--on-invalid", "flag"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--output", str(killed)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "shards").glob("*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "shards").glob("*.parquet")))
    assert 2 <= done_before < 10, "the run should be killed mid-way"
    assert not (killed / "annotated.parquet").exists()

    subprocess.run(args + ["--output", str(killed)], check=True)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["resumed"] and manifest["timings"]["rows_scored_this_call"] <= 40 - 4 * done_before + 4
    subprocess.run(args + ["--output", str(tmp_path / "clean")], check=True)
    resumed = pl.read_parquet(killed / "annotated.parquet")
    clean = pl.read_parquet(tmp_path / "clean" / "annotated.parquet")
    assert resumed.equals(clean)


def test_changed_settings_are_refused_unless_overwrite(tiny_gpt2, instruct_file, tmp_path):
    run(instruct_file, tiny_gpt2, tmp_path / "run", limit=5)
    with pytest.raises(ValueError, match=r"generation.max_new_tokens: 6 -> 7"):
        run(instruct_file, tiny_gpt2, tmp_path / "run", limit=5, max_new_tokens=7)
    # Performance-only settings may change on resume.
    run(instruct_file, tiny_gpt2, tmp_path / "run", limit=5, batch_size=2)
    result = run(instruct_file, tiny_gpt2, tmp_path / "run", limit=5, max_new_tokens=7, overwrite=True)
    assert result.manifest["config"]["generation"]["max_new_tokens"] == 7


def test_on_invalid_policies(tiny_gpt2, tmp_path):
    rows = [
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "", "response": "nothing to answer"},
        {"prompt": None, "response": "null prompt"},
        {"prompt": "Say nothing.", "response": ""},  # empty reference: still scored
        {"prompt": "Count.", "response": None},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidRowError, match=r"3 row\(s\).*row 1: column 'prompt' is empty.*row 2: column 'prompt' is null.*row 4: column 'response' is null"):
        run(data, tiny_gpt2, tmp_path / "e")

    skipped = run(data, tiny_gpt2, tmp_path / "s", on_invalid="skip")
    df = skipped.to_polars()
    assert df["srd_id"].to_list() == [0, 3]
    assert skipped.manifest["counts"]["rows_skipped"] == 3
    assert sorted(df["difficulty_rank"].to_list()) == [1, 2]
    empty_ref = df.filter(pl.col("srd_id") == 3).row(0, named=True)
    assert empty_ref["rouge_l"] == 0.0 and empty_ref["reference_tokens"] == 1 and empty_ref["ce_loss"] > 0

    flagged = run(data, tiny_gpt2, tmp_path / "f", on_invalid="flag")
    df = flagged.to_polars()
    assert df.height == 5 and flagged.manifest["counts"]["rows_flagged"] == 3
    bad = df.filter(pl.col("invalid_reason").is_not_null())
    assert bad["srd_id"].to_list() == [1, 2, 4]
    assert bad["ce_loss"].null_count() == 3 and bad["difficulty_rank"].null_count() == 3


def test_long_prompt_truncated_and_flagged(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "word " * 400, "response": "ok"}, {"prompt": "short", "response": "ok"}])
    df = run(data, tiny_gpt2, tmp_path / "r", max_prompt_tokens=32, template="raw").to_polars()
    assert df["prompt_truncated"].to_list() == [True, False]
    assert df["prompt_tokens"][0] == 32
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["counts"]["prompts_truncated"] == 1


def test_unicode_emoji_cjk_text(tiny_llama, tmp_path):
    rows = [{"prompt": "翻译：你好世界", "response": "Hello world 😀"}, {"prompt": "مرحبا 😀", "response": "你好"}, {"prompt": "Ünïcödé", "response": "ünïcödé"}]
    df = run(write_jsonl(tmp_path / "u.jsonl", rows), tiny_llama, tmp_path / "r", template="raw", rouge_tokenizer="unicode").to_polars()
    assert df.height == 3 and df["ce_loss"].is_finite().all()
    assert df["prompt_text"].to_list() == [r["prompt"] for r in rows]


def test_loading_formats_and_layouts(tiny_gpt2, tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": f"it is {i + 1}", "extra": i} for i in range(4)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "d.csv")
    ds.to_parquet(tmp_path / "d.parquet")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "disk")
    for i, source in enumerate([tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "disk"]):
        df = run(source, tiny_gpt2, tmp_path / f"r{i}", template="Q: {question}\nA: ").to_polars()
        assert df["prompt_text"].to_list() == [f"Q: What is {i}+1?\nA: " for i in range(4)]
    test_split = run(tmp_path / "disk", tiny_gpt2, tmp_path / "rt", split="test", template="raw").to_polars()
    assert test_split.height == 1


def test_chat_messages_layout(tiny_gpt2, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    chat_model = tmp_path / "chat-model"
    AutoModelForCausalLM.from_pretrained(tiny_gpt2).save_pretrained(chat_model)
    tok.save_pretrained(chat_model)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    result = run(write_jsonl(tmp_path / "m.jsonl", rows), chat_model, tmp_path / "r")
    assert result.to_polars()["prompt_text"].to_list() == ["<|user|>Hi\n<|assistant|>"]
    assert result.manifest["config"]["prompt"]["template"] == "chat"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_column="nope"), r"--prompt-column 'nope' is not a column.*available columns: instruction, input, output"),
        (dict(template="Q: {question}"), r"\{question\}.*not columns.*available columns"),
        (dict(max_new_tokens=0), r"generation.max_new_tokens: Input should be greater than or equal to 1"),
        (dict(model="/no/such/model"), r"model folder /no/such/model does not exist"),
        (dict(model="someone/not-a-model"), r"could not load the tokenizer of model 'someone/not-a-model'"),
        (dict(dataset="someone/not-a-dataset"), r"loading it from the Hugging Face hub failed"),
        (dict(dataset="missing.jsonl"), r"data file not found: missing.jsonl"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_gpt2, instruct_file, tmp_path, kwargs, message):
    settings = dict(dataset=str(instruct_file), model=str(tiny_gpt2), output=str(tmp_path / "r"), progress=False)
    settings.update(kwargs)
    with pytest.raises((ValueError, OSError), match=message):
        score(**settings)


def test_empty_dataset_and_file_as_output(tiny_gpt2, instruct_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, [{"prompt": "a", "response": "b"}])
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]).select([]).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="has 0 rows"):
        run(tmp_path / "empty.parquet", tiny_gpt2, tmp_path / "r")
    as_file = tmp_path / "out.txt"
    as_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run(instruct_file, tiny_gpt2, as_file)


def test_tokenizer_without_pad_and_without_eos(tiny_llama_no_pad, tiny_gpt2, instruct_file, tmp_path):
    assert run(instruct_file, tiny_llama_no_pad, tmp_path / "nopad", limit=3).to_polars().height == 3
    no_eos = tmp_path / "no-eos"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.eos_token = None
    tok.save_pretrained(no_eos)
    AutoModelForCausalLM.from_pretrained(tiny_gpt2).save_pretrained(no_eos)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        run(instruct_file, no_eos, tmp_path / "r1", limit=2)
    df = run(instruct_file, no_eos, tmp_path / "r2", limit=2, eos_token="</s>").to_polars()
    assert df.height == 2


def test_cli_with_config_file_and_flag_override(tiny_gpt2, instruct_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_gpt2}\noutput: {tmp_path / 'run'}\nmax_new_tokens: 3\ngeneration:\n  no_repeat_ngram_size: 2\nlimit: 4\ndevice: cpu\n")
    result = CliRunner().invoke(main, ["score", str(instruct_file), "--config", str(config), "--max-new-tokens", "5", "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["generation"] == {"max_new_tokens": 5, "no_repeat_ngram_size": 2}
    assert manifest["counts"]["rows_scored"] == 4

    toml = tmp_path / "bad.toml"
    toml.write_text('max_new_tokens = "many"\n')
    bad = CliRunner().invoke(main, ["score", str(instruct_file), "--model", str(tiny_gpt2), "-o", str(tmp_path / "x"), "--config", str(toml)])
    assert bad.exit_code != 0 and "generation.max_new_tokens" in bad.output and "Traceback" not in bad.output
    missing = CliRunner().invoke(main, ["score", str(instruct_file), "--output", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "--model is required" in missing.output


def test_python_api_is_exported():
    for name in ("score", "export_curriculum", "load_curriculum", "rouge_l", "ScoreConfig"):
        assert hasattr(srdata, name), name
