"""``srdata teach``: the teacher's pass over a scored run, against a plain transformers forward pass."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import srdata
from srdata.steps.teacher import row_top_k, token_ids_digest
from srdata.steps.tokenize import encode_pairs
from srdata.teacher_pass import TeachError

from .conftest import corpus, write_jsonl

FAST = dict(device="cpu", dtype="float32", max_new_tokens=4, progress=False)


@pytest.fixture(scope="module")
def teacher_llama(tmp_path_factory) -> Path:
    """A bigger random Llama with the tiny student's tokenizer (trained on the same corpus)."""
    from srdata.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "llama", corpus(), arch="llama", hidden_size=96, num_layers=3, seed=1)


@pytest.fixture()
def scored_run(tiny_llama, tmp_path) -> Path:
    rows = [{"instruction": f"Repeat the word {w} twice.", "input": "", "output": f"{w} {w}"} for w in corpus()[0].split()[:9]]
    rows.append({"instruction": "", "input": "", "output": "x"})  # invalid: an empty prompt, flagged
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    srdata.score(dataset=str(data), model=str(tiny_llama), output=str(tmp_path / "run"), shard_size=4, on_invalid="flag", **FAST)
    return tmp_path / "run"


def plain_logprobs(model, prompt_ids: list[int], reference_ids: list[int]) -> torch.Tensor:
    """log p(. | prefix) at the positions predicting each reference token, float64: (reference tokens, vocab)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + reference_ids])).logits[0].double()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits, dim=-1)[start : start + len(reference_ids)]


def encoded_rows(run: Path, tokenizer) -> pl.DataFrame:
    """The run's rows encoded again, as the scoring run did (alpaca template: the tokenizer adds its specials)."""
    rows = pl.read_parquet(run / "annotated.parquet").filter(pl.col("invalid_reason").is_null()).sort("srd_id")
    pairs = encode_pairs(tokenizer, rows["prompt_text"].to_list(), rows["reference_text"].to_list(), max_prompt_tokens=256, max_reference_tokens=256)
    return rows.with_columns(pl.Series("pair", range(rows.height))), pairs


def teacher_shards(run: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted((run / "teacher" / "shards").glob("shard-*.parquet"))])


def test_teacher_ce_and_top_k_equal_a_plain_forward_pass(scored_run, teacher_llama):
    result = srdata.teach(run=scored_run, teacher=str(teacher_llama), top_k=6, **{k: v for k, v in FAST.items() if k != "max_new_tokens"})
    assert result.manifest["status"] == "complete" and result.manifest["counts"]["rows_taught"] == 9
    tokenizer = AutoTokenizer.from_pretrained(teacher_llama)
    model = AutoModelForCausalLM.from_pretrained(teacher_llama).eval()
    rows, pairs = encoded_rows(scored_run, tokenizer)
    stored = teacher_shards(scored_run)
    annotated = pl.read_parquet(scored_run / "annotated.parquet")
    assert annotated.filter(pl.col("invalid_reason").is_not_null())["teacher_ce_loss"].to_list() == [None]
    import pyarrow.parquet as pq  # the rewritten table still says which ranking its rank columns are

    assert json.loads(pq.read_metadata(scored_run / "annotated.parquet").metadata[b"srdata.ranking"])["name"] == "paper"
    for row, pair in zip(rows.iter_rows(named=True), pairs):
        expected = plain_logprobs(model, pair.prompt_ids, pair.reference_ids)
        nll = -expected.gather(1, torch.tensor(pair.reference_ids)[:, None]).mean().item()
        assert row["teacher_ce_loss"] == pytest.approx(nll, rel=1e-5)
        assert row["excess_ce_loss"] == pytest.approx(row["ce_loss"] - row["teacher_ce_loss"], abs=1e-12)
        kept = stored.filter(pl.col("srd_id") == row["srd_id"]).row(0, named=True)
        assert kept["token_ids_sha256"] == token_ids_digest(pair.prompt_ids, pair.reference_ids)
        ids, logprobs = row_top_k(kept["top_ids"], kept["top_logprobs"], kept["reference_tokens"], 6)
        np.testing.assert_allclose(logprobs, expected.topk(6, dim=-1).values.numpy(), atol=2e-3, rtol=2e-3)  # float16 storage
        np.testing.assert_allclose(logprobs, expected.gather(1, torch.from_numpy(ids)).numpy(), atol=2e-3, rtol=2e-3)
    # the run manifest names the teacher; export carries the columns into every stage file
    assert json.loads((scored_run / "manifest.json").read_text())["teacher"]["top_k"] == 6
    folder = srdata.export_curriculum(scored_run, stages=3, keep=2)
    stage = pl.read_parquet(folder / "stage-1.parquet")
    assert {"teacher_ce_loss", "excess_ce_loss"} <= set(stage.columns) and stage["teacher_ce_loss"].null_count() == 0


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has another vocabulary (400 tokens, not 512)."""
    from srdata.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "llama", corpus(), arch="llama", vocab_size=400)


def test_a_tokenizer_that_differs_is_refused_before_any_work(scored_run, other_tokenizer_model):
    with pytest.raises(TeachError, match="does not share the student's tokenizer, so it cannot score the run's token ids: the student's tokenizer has 512 tokens, the teacher's 400; 112 token\\(s\\) have other ids"):
        srdata.teach(run=scored_run, teacher=str(other_tokenizer_model), device="cpu", progress=False)
    assert not (scored_run / "teacher").exists()
    assert "teacher_ce_loss" not in pl.read_parquet(scored_run / "annotated.parquet").columns


def test_a_padded_vocabulary_is_accepted_and_said(scored_run, teacher_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(teacher_llama)
    tokenizer = AutoTokenizer.from_pretrained(teacher_llama)
    model.resize_token_embeddings(len(tokenizer) + 64)  # the output layer padded past the tokenizer
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    said: list[str] = []
    srdata.teach(run=scored_run, teacher=str(tmp_path / "padded"), top_k=4, device="cpu", progress=False, echo=said.append)
    assert any("padded" in line and "64 padding ids" in line for line in said)
    assert pl.read_parquet(scored_run / "annotated.parquet")["teacher_ce_loss"].null_count() == 1


def test_bad_runs_and_a_second_teacher_are_refused(scored_run, teacher_llama, tiny_llama, tmp_path):
    with pytest.raises(TeachError, match="holds no scored run"):
        srdata.teach(run=tmp_path / "nothing", teacher=str(teacher_llama), device="cpu", progress=False)
    srdata.teach(run=scored_run, teacher=str(teacher_llama), device="cpu", progress=False)
    before = (scored_run / "annotated.parquet").read_bytes()
    with pytest.raises(TeachError, match="already holds the teach pass of .*--overwrite"):
        srdata.teach(run=scored_run, teacher=str(tiny_llama), device="cpu", progress=False)
    with pytest.raises(TeachError, match="--top-k 0.*--overwrite"):
        srdata.teach(run=scored_run, teacher=str(teacher_llama), top_k=3, device="cpu", progress=False)
    assert (scored_run / "annotated.parquet").read_bytes() == before
    # the same pass again resumes (nothing to do); --overwrite replaces it with the other teacher
    srdata.teach(run=scored_run, teacher=str(teacher_llama), device="cpu", progress=False)
    srdata.teach(run=scored_run, teacher=str(tiny_llama), overwrite=True, device="cpu", progress=False)
    annotated = pl.read_parquet(scored_run / "annotated.parquet").drop_nulls("ce_loss")
    # the student as its own teacher: the same forward pass, so no excess
    assert annotated["excess_ce_loss"].abs().max() < 1e-5


def test_a_teacher_too_short_for_the_run_is_refused(scored_run, tmp_path, teacher_llama):
    from transformers import AutoConfig

    short = tmp_path / "short"
    model = AutoModelForCausalLM.from_pretrained(teacher_llama)
    model.config.max_position_embeddings = 8
    model.save_pretrained(short)
    AutoTokenizer.from_pretrained(teacher_llama).save_pretrained(short)
    assert AutoConfig.from_pretrained(short).max_position_embeddings == 8
    with pytest.raises(TeachError, match="has 8 positions, but the run's longest prompt \\+ reference holds"):
        srdata.teach(run=scored_run, teacher=str(short), device="cpu", progress=False)


def test_a_killed_teach_pass_resumes_with_nothing_lost_or_duplicated(tiny_llama, teacher_llama, tmp_path):
    rows = [{"instruction": f"Write {i} in words, then {i + 1}.", "input": "", "output": f"number {i} then {i + 1}"} for i in range(24)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for run in (clean, killed):
        srdata.score(dataset=str(data), model=str(tiny_llama), output=str(run), shard_size=3, **FAST)
    srdata.teach(run=clean, teacher=str(teacher_llama), top_k=4, device="cpu", dtype="float32", batch_size=1, progress=False)
    args = [sys.executable, "-m", "srdata.cli", "teach", str(killed), "--teacher", str(teacher_llama), "--top-k", "4",
            "--device", "cpu", "--dtype", "float32", "--batch-size", "1", "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = killed / "teacher" / "shards"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.glob("shard-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"the teach pass ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(shards.glob("shard-*.parquet")))
    assert 2 <= finished < 8
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert teacher_shards(killed).sort("srd_id").equals(teacher_shards(clean).sort("srd_id"))
    assert teacher_shards(killed)["srd_id"].to_list() == list(range(24))
    a = pl.read_parquet(killed / "annotated.parquet").select("srd_id", "teacher_ce_loss", "excess_ce_loss")
    b = pl.read_parquet(clean / "annotated.parquet").select("srd_id", "teacher_ce_loss", "excess_ce_loss")
    assert a.equals(b)
    assert json.loads((killed / "teacher" / "manifest.json").read_text())["resumed"] is True


def test_the_cli_says_what_is_wrong_without_a_traceback(scored_run, other_tokenizer_model):
    done = subprocess.run([sys.executable, "-m", "srdata.cli", "teach", str(scored_run), "--teacher", str(other_tokenizer_model), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "does not share the student's tokenizer" in done.stderr
    done = subprocess.run([sys.executable, "-m", "srdata.cli", "teach", str(scored_run)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--teacher is required" in done.stderr


def test_smollm2_as_its_own_teacher_reproduces_its_cross_entropy(smollm2, shared_data_dir, tmp_path):
    """A real model with its chat template: the teacher pass equals the scoring pass and a plain forward pass."""
    t0 = pl.read_parquet(shared_data_dir / "t0-train.parquet")
    frame = t0.filter((pl.col("response").str.len_chars() > 0) & (pl.col("prompt").str.len_chars() < 400)).head(6)
    data = tmp_path / "t0.parquet"
    frame.select("prompt", "response").write_parquet(data)
    run = tmp_path / "run"
    srdata.score(dataset=str(data), model=str(smollm2), output=str(run), max_prompt_tokens=128, max_reference_tokens=32, **FAST)
    srdata.teach(run=run, teacher=str(smollm2), top_k=8, device="cpu", dtype="float32", progress=False)
    annotated = pl.read_parquet(run / "annotated.parquet").sort("srd_id")
    np.testing.assert_allclose(annotated["teacher_ce_loss"].to_numpy(), annotated["ce_loss"].to_numpy(), rtol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    whole = annotated.filter(~pl.col("prompt_truncated") & ~pl.col("reference_truncated")).head(2)
    assert whole.height >= 1
    stored = teacher_shards(run)
    for row in whole.iter_rows(named=True):
        kept = stored.filter(pl.col("srd_id") == row["srd_id"]).row(0, named=True)
        # chat template: the rendered prompt holds its own special tokens; the reference ends with EOS
        prompt_ids = tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
        reference_ids = tokenizer(row["reference_text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert token_ids_digest(prompt_ids, reference_ids) == kept["token_ids_sha256"]
        expected = plain_logprobs(model, prompt_ids, reference_ids)
        nll = -expected.gather(1, torch.tensor(reference_ids)[:, None]).mean().item()
        assert kept["teacher_ce_loss"] == pytest.approx(nll, rel=1e-4)
        _, logprobs = row_top_k(kept["top_ids"], kept["top_logprobs"], kept["reference_tokens"], 8)
        np.testing.assert_allclose(logprobs, expected.topk(8, dim=-1).values.numpy(), atol=5e-3, rtol=2e-3)


def test_rank_by_teachable_needs_and_uses_the_teacher_pass(scored_run, teacher_llama):
    from srdata.steps.rank import RANK_PRESETS, RankingError

    with pytest.raises(RankingError, match="written by the teacher pass: run `srdata teach RUN --teacher TEACHER` first"):
        srdata.export_curriculum(scored_run, rank_by="teachable")
    srdata.teach(run=scored_run, teacher=str(teacher_llama), device="cpu", progress=False)
    folder = srdata.export_curriculum(scored_run, stages=3, keep=2, rank_by="teachable")
    summary = json.loads((folder / "curriculum.json").read_text())
    assert RANK_PRESETS["teachable"] == "teacher_ce_loss:asc:3,rouge_l:desc,ce_loss:asc"
    # the row the teacher finds hardest is in the dropped part
    annotated = pl.read_parquet(scored_run / "annotated.parquet").drop_nulls("teacher_ce_loss")
    hardest = annotated.sort("teacher_ce_loss").tail(1)["srd_id"].item()
    kept = pl.concat([pl.read_parquet(folder / s["file"]) for s in summary["stages"]])["srd_id"].to_list()
    assert hardest not in kept
