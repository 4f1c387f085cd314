"""``--signals ifd``: ``ce_loss_uncond``, ``ifd`` and ``pmi`` against a plain transformers forward pass.

The reference computation is written here, independent of srdata's encoding code: the
unconditional prompt is built by hand for each template (the alpaca text with an empty
instruction; the BOS token for ``raw``; the chat template applied to an empty user turn),
the reference ids are ``tokenizer(reference, add_special_tokens=False) + [eos]`` (cut to
``--max-reference-tokens`` where set), and one unpadded ``model(ids).logits`` gives the
mean NLL over the reference positions in float64.

Models: tiny random Llama (alpaca, with a BOS) and GPT-2 (raw, no BOS added) on the
transformers backend; the real SmolLM2-135M-Instruct (chat template) on the transformers
backend and on the real vLLM engine; a tiny Llama with head size 32 on the vLLM engine.
Also: the columns are null when the signal is off, an unknown signal is refused with a
message naming the known ones, a run scored without the signal refuses to resume with it,
runs whose shards predate the columns resume, and the ``noisy`` preset ranks.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from srdata.cli import main
from srdata.pipeline import score
from srdata.steps.prompts import ALPACA
from srdata.steps.rank import RANK_PRESETS, RankingError, parse_rank_by, rank

from .conftest import DEMO_SAMPLE, write_jsonl

FAST = dict(max_new_tokens=4, device="cpu", dtype="float32")
RTOL = 1e-4  # float32 forward passes on both sides
MiB = 1 << 20


def run(dataset, model, out, **kw):
    return score(dataset=str(dataset), model=str(model), output=str(out), progress=False, **{**FAST, **kw})


@torch.inference_mode()
def plain_nll(model, prompt_ids: list[int], reference_ids: list[int]) -> float:
    """Mean NLL (nats) of ``reference_ids`` after ``prompt_ids``: one unpadded forward, float64 log-softmax."""
    logits = model(input_ids=torch.tensor([prompt_ids + reference_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    picked = logprobs[start : start + len(reference_ids)].gather(1, torch.tensor(reference_ids)[:, None])
    return float(-picked.mean())


def reference_ids(tokenizer, text: str, cap: int | None = None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:cap] if cap is not None else ids


def check_against_plain(frame: pl.DataFrame, model_path: Path, uncond_ids: list[int], references: list[str], cap: int | None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    frame = frame.sort("srd_id")
    for row, text in zip(frame.iter_rows(named=True), references):
        ids = reference_ids(tokenizer, text, cap)
        assert row["reference_tokens"] == len(ids)
        expected = plain_nll(model, uncond_ids, ids)
        assert row["ce_loss_uncond"] == pytest.approx(expected, rel=RTOL), row["srd_id"]
        assert row["ifd"] == pytest.approx(row["ce_loss"] / row["ce_loss_uncond"], rel=1e-12)
        assert not row["prompt_truncated"]  # the row's prompt ids below are the whole prompt
        expected_pmi = (expected - plain_nll(model, prompt_ids(tokenizer, row["prompt_text"]), ids)) * len(ids)
        assert row["pmi"] == pytest.approx(expected_pmi, rel=1e-3, abs=1e-3), row["srd_id"]
    # Not vacuous: the prompt matters, so conditional and unconditional losses differ.
    assert (frame["ce_loss"] - frame["ce_loss_uncond"]).abs().max() > 1e-3


def prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    """The row's own prompt ids, built by hand: with the tokenizer's specials unless it is a chat prompt."""
    chat = prompt_text.startswith("<|im_start|>")
    return tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]


def demo_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()][:n]


# ------------------------------------------------------------- transformers backend, tiny
def test_alpaca_uncond_matches_plain_forward_with_truncated_references(tiny_llama, tmp_path):
    rows = demo_rows(6)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    # A reference cap that cuts some references: the unconditional score uses the same cut ids.
    result = run(data, tiny_llama, tmp_path / "run", signals="ifd", max_reference_tokens=12, max_prompt_tokens=768, batch_size=4)
    frame = result.to_polars()
    assert frame["reference_truncated"].any() and not frame["reference_truncated"].all()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    uncond_text = ALPACA.format(instruction="")
    assert result.manifest["unconditional_prompt"] == uncond_text
    uncond_ids = tokenizer(uncond_text)["input_ids"]  # the Llama tokenizer adds its BOS
    assert uncond_ids[0] == tokenizer.bos_token_id
    check_against_plain(frame, tiny_llama, uncond_ids, [r["output"] for r in rows], cap=12)


def test_raw_template_without_bos_scores_after_one_context_token(tiny_gpt2, tmp_path):
    rows = [{"prompt": r["instruction"], "response": r["output"]} for r in demo_rows(5)]
    result = run(write_jsonl(tmp_path / "d.jsonl", rows), tiny_gpt2, tmp_path / "run", template="raw", signals="ifd")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert tokenizer("")["input_ids"] == []  # nothing to condition on: the BOS token is the context
    assert result.manifest["unconditional_prompt"] == ""
    check_against_plain(result.to_polars(), tiny_gpt2, [tokenizer.bos_token_id], [r["response"] for r in rows], cap=256)


def test_columns_are_null_without_the_signal_and_rank_presets(tiny_gpt2, instruct_file, tmp_path):
    off = run(instruct_file, tiny_gpt2, tmp_path / "off").to_polars()
    assert off.schema["ce_loss_uncond"] == pl.Float64 and off.schema["ifd"] == pl.Float64
    for column in ("ce_loss_uncond", "ifd", "pmi"):
        assert off.schema[column] == pl.Float64 and off[column].null_count() == off.height, column  # null, not NaN or 0
    assert "unconditional_prompt" not in json.loads((tmp_path / "off" / "manifest.json").read_text())
    with pytest.raises(RankingError, match=r"'ifd' is empty.*--signals ifd"):
        rank(off, rank_by="noisy")
    with pytest.raises(RankingError, match=r"'pmi' is empty.*--signals ifd"):
        rank(off, rank_by="pmi:desc")

    on = run(instruct_file, tiny_gpt2, tmp_path / "on", signals="ifd").to_polars()
    assert on["ifd"].null_count() == on["pmi"].null_count() == 0 and (on["ifd"] > 0).all()
    # The scores the signal does not touch are the same with and without it.
    assert on["ce_loss"].to_list() == off["ce_loss"].to_list() and on["rouge_l"].to_list() == off["rouge_l"].to_list()
    assert on["difficulty_rank"].to_list() == off["difficulty_rank"].to_list()  # the default ranking stays the paper's
    preset = rank(on, rank_by="noisy")
    assert preset["difficulty_rank"].to_list() == rank(on, rank_by=RANK_PRESETS["noisy"])["difficulty_rank"].to_list()
    assert rank(on, rank_by="paper")["difficulty_rank"].to_list() == on["difficulty_rank"].to_list()
    assert sorted(preset["difficulty_rank"].to_list()) == list(range(1, on.height + 1))
    # Ranking by IFD alone: easiest = lowest IFD.
    by_ifd = rank(on, rank_by="ifd:asc")
    assert by_ifd.sort("difficulty_rank")["ifd"].is_sorted()

    # The curriculum commands take the preset by name.
    rerank = CliRunner().invoke(main, ["rank", str(tmp_path / "on"), "--rank-by", "noisy"])
    assert rerank.exit_code == 0, rerank.output
    refused = CliRunner().invoke(main, ["export", str(tmp_path / "off"), "--rank-by", "noisy"])
    assert refused.exit_code != 0 and "--signals ifd" in refused.output


def test_preset_names_parse_and_bad_specs_name_the_presets():
    assert [k.spec() for k in parse_rank_by("paper")] == ["rouge_l:desc", "ce_loss:asc"]
    assert parse_rank_by(" NOISY ") == parse_rank_by(RANK_PRESETS["noisy"])
    assert {k.column for k in parse_rank_by("noisy")} <= {"ifd", "pmi", "ce_loss", "rouge_l", "ce_loss_uncond"}
    assert any(k.column in ("ifd", "pmi") for k in parse_rank_by("noisy"))
    with pytest.raises(RankingError, match="presets paper, noisy"):
        parse_rank_by("noisier")


def test_bad_signal_value_is_refused_with_the_known_ones(tiny_gpt2, instruct_file, tmp_path):
    result = CliRunner().invoke(
        main, ["score", str(instruct_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "r"), "--signals", "ifd,perplexity", "-q"]
    )
    assert result.exit_code != 0
    assert "unknown signal 'perplexity' in --signals" in result.output and "ifd (adds ce_loss_uncond, ifd, pmi)" in result.output
    assert not (tmp_path / "r" / "annotated.parquet").exists()
    # The list form of a config file, and "none", are accepted.
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"metrics": {"signals": ["ifd"]}, "max_new_tokens": 3, "limit": 2, "device": "cpu"}))
    ok = CliRunner().invoke(main, ["score", str(instruct_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "c"), "--config", str(config), "-q"])
    assert ok.exit_code == 0, ok.output
    assert pl.read_parquet(tmp_path / "c" / "annotated.parquet")["ifd"].null_count() == 0
    none = CliRunner().invoke(main, ["score", str(instruct_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "n"), "--signals", "none", "--limit", "2", "--max-new-tokens", "2", "-q"])
    assert none.exit_code == 0, none.output
    assert pl.read_parquet(tmp_path / "n" / "annotated.parquet")["ifd"].null_count() == 2


def test_resume_with_another_signal_setting_is_refused_and_old_shards_resume(tiny_gpt2, instruct_file, tmp_path):
    out = tmp_path / "run"
    first = run(instruct_file, tiny_gpt2, out, shard_size=5).to_polars()
    with pytest.raises(ValueError, match=r"(?s)metrics\.signals: None -> \[.ifd.\].*--overwrite"):
        run(instruct_file, tiny_gpt2, out, shard_size=5, signals="ifd")

    # A run whose shards were written before the columns existed: one shard rewritten
    # without them, one deleted; the same settings resume and the old rows read as null.
    shard0, shard2 = out / "shards" / "shard-00000.parquet", out / "shards" / "shard-00002.parquet"
    pl.read_parquet(shard0).drop("ce_loss_uncond", "ifd").write_parquet(shard0)
    shard2.unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "signals" not in manifest["settings"]["metrics"]  # what a run from before the option recorded too
    resumed = run(instruct_file, tiny_gpt2, out, shard_size=5)
    assert resumed.manifest["resumed"]
    frame = resumed.to_polars()
    assert frame["ce_loss_uncond"].null_count() == frame.height and frame.schema["ifd"] == pl.Float64
    assert frame["ce_loss"].to_list() == pytest.approx(first["ce_loss"].to_list(), rel=1e-6)


# --------------------------------------------------------------- real SmolLM2, both backends
@pytest.fixture(scope="module")
def smol_rows(smollm2, shared_data_dir, tmp_path_factory):
    """Four real rows (short T0 prompts, a SelfInst row) and the plain forward pass's ce_loss_uncond."""
    t0 = pl.read_parquet(shared_data_dir / "t0-train.parquet").filter(
        (pl.col("response").str.len_chars() > 0) & (pl.col("prompt").str.len_chars() < 300)
    ).sample(3, seed=3)
    rows = [{"prompt": p, "response": r} for p, r in zip(t0["prompt"], t0["response"])]
    selfinst = json.loads((shared_data_dir / "selfinst-252.jsonl").read_text(encoding="utf-8").splitlines()[5])
    rows.append({"prompt": selfinst["instruction"], "response": selfinst["instances"][0]["output"]})
    data = write_jsonl(tmp_path_factory.mktemp("smol") / "rows.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    # The chat template on an empty user turn, with the assistant header: built here from the
    # template alone (the system turn is SmolLM2's default one).
    uncond_ids = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True, return_dict=False)
    text = tokenizer.decode(uncond_ids)
    assert text.endswith("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n") and "system" in text
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    expected = [plain_nll(model, list(uncond_ids), reference_ids(tokenizer, r["response"], cap=24)) for r in rows]
    del model
    gc.collect()
    return data, expected


def check_real_run(frame: pl.DataFrame, expected: list[float]) -> None:
    frame = frame.sort("srd_id")
    got = frame["ce_loss_uncond"].to_list()
    worst = max(abs(a - b) / b for a, b in zip(got, expected))
    assert worst <= RTOL, f"ce_loss_uncond differs from the plain forward pass by {worst:.2e} (relative)"
    assert frame["ifd"].to_list() == pytest.approx((frame["ce_loss"] / frame["ce_loss_uncond"]).to_list(), rel=1e-12)
    pmi = (frame["ce_loss_uncond"] - frame["ce_loss"]) * frame["reference_tokens"]
    assert frame["pmi"].to_list() == pytest.approx(pmi.to_list(), rel=1e-9)
    # A real model is helped by the prompt on real rows: IFD below 1 on most of them.
    assert (frame["ifd"] < 1).sum() >= 3


def test_real_model_uncond_matches_plain_forward_on_transformers(smollm2, smol_rows, tmp_path):
    data, expected = smol_rows
    result = run(data, smollm2, tmp_path / "hf", template="chat", max_reference_tokens=24, signals="ifd", backend="hf")
    check_real_run(result.to_polars(), expected)


@pytest.fixture()
def eager_vllm(monkeypatch):
    """The real vLLM engine, eager and with a fixed small KV cache (see tests/test_vllm_engine.py for why)."""
    try:
        from srdata.backends import vllm as vb

        vb.require_vllm()
    except Exception as err:  # noqa: BLE001 - any import failure means "no engine here"
        from tests.real_models import unavailable

        unavailable(f"vLLM cannot be imported ({type(err).__name__}: {err})")
    original = vb.VLLMBackend.from_pretrained.__func__

    def eager(cls, model, **options):
        return original(cls, model, **{**options, "enforce_eager": True, "engine_args": {"kv_cache_memory_bytes": 256 * MiB}})

    monkeypatch.setattr(vb.VLLMBackend, "from_pretrained", classmethod(eager))


def test_real_model_uncond_matches_plain_forward_on_vllm(smollm2, smol_rows, tmp_path, eager_vllm):
    data, expected = smol_rows
    result = run(
        data, smollm2, tmp_path / "vllm", template="chat", max_reference_tokens=24, signals="ifd", backend="vllm",
        gpu_memory_utilization=0.1, max_model_len=1024,
    )
    assert result.manifest["backend"] == "vllm"
    check_real_run(result.to_polars(), expected)


def test_tiny_model_uncond_matches_plain_forward_on_vllm(tmp_path, eager_vllm):
    from srdata.demo.tiny import build_tiny_model

    from .conftest import corpus

    model = build_tiny_model(tmp_path / "llama", corpus(), arch="llama", num_heads=2)  # head size 32 for vLLM's CPU attention
    rows = demo_rows(5)
    result = run(
        write_jsonl(tmp_path / "d.jsonl", rows), model, tmp_path / "vllm", signals="ifd", backend="vllm",
        gpu_memory_utilization=0.1, max_model_len=1024, max_prompt_tokens=768,
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    check_against_plain(result.to_polars(), model, tokenizer(ALPACA.format(instruction=""))["input_ids"], [r["output"] for r in rows], cap=256)
