"""``--dtype auto`` on a CPU: bfloat16 where torch reports AMX or AVX512-BF16, float32 elsewhere
(bfloat16 matmuls emulated); the choice is printed, recorded in the manifest, checked on
resume, and followed by the teach pass and srd-distill (issue 28).

The CPU's capability is simulated by replacing torch's own queries
(``torch.cpu._is_amx_tile_supported`` / ``_is_avx512_bf16_supported``), so the rule is
tested for both kinds of CPU on whatever machine runs the tests.
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import torch
from click.testing import CliRunner

import srdata
from srdata.backends import decode_attention_kernel, resolve_run_dtype
from srdata.backends.dtype import CpuBfloat16, auto_dtype, cpu_bfloat16, resolve_dtype, resolve_dtype_with_reason
from srdata.cli import main
from srdata.run.folder import RunDirError, read_manifest

from .conftest import write_jsonl

FAST = dict(device="cpu", max_new_tokens=4, shard_size=8, progress=False)


def simulate_cpu(monkeypatch, *, amx: bool, avx512_bf16: bool) -> None:
    """Make torch report (or not) AMX and AVX512-BF16, as on another CPU."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


def rows(n: int) -> list[dict]:
    return [{"instruction": f"Name animal number {i}.", "input": "", "output": f"The animal is a cat, number {i}."} for i in range(n)]


@pytest.mark.parametrize(
    ("device", "cpu", "expected"),
    [
        ("cpu", CpuBfloat16(amx=False, avx512_bf16=False), torch.float32),
        ("cpu", CpuBfloat16(amx=True, avx512_bf16=True), torch.bfloat16),
        ("cpu", CpuBfloat16(amx=True, avx512_bf16=False), torch.bfloat16),
        ("cpu", CpuBfloat16(amx=False, avx512_bf16=True), torch.bfloat16),
        ("cuda", CpuBfloat16(amx=False, avx512_bf16=False), torch.bfloat16),
    ],
)
def test_the_auto_rule_for_each_kind_of_cpu(device, cpu, expected):
    dtype, reason = auto_dtype(device, cpu)
    assert dtype == expected
    if device == "cpu":
        assert ("has AMX" in reason) == cpu.amx
        assert ("has AVX512-BF16" in reason) == (cpu.avx512_bf16 and not cpu.amx)
        assert ("no native bfloat16" in reason) == (not cpu.amx and not cpu.avx512_bf16)


def test_the_rule_reads_torchs_capability_queries(monkeypatch):
    simulate_cpu(monkeypatch, amx=False, avx512_bf16=False)
    assert cpu_bfloat16() == CpuBfloat16(False, False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    simulate_cpu(monkeypatch, amx=True, avx512_bf16=False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    # float32 stays selectable on any CPU, and an explicit choice is never changed
    assert resolve_dtype_with_reason("float32", torch.device("cpu")) == (torch.float32, "as asked (--dtype float32)")
    simulate_cpu(monkeypatch, amx=False, avx512_bf16=False)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    # a torch without the queries counts as a CPU without the fast path: float32, never less exact
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", torch.device("cpu"))


def test_vllm_auto_stays_bfloat16():
    assert resolve_run_dtype("vllm", "cuda", "auto") == ("bfloat16", "auto: bfloat16 with vLLM")
    assert resolve_run_dtype("vllm", "cuda", "float32")[0] == "float32"


def test_the_resolved_dtype_is_printed_recorded_used_and_checked_on_resume(tiny_gpt2, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", rows(6))
    said: list[str] = []
    simulate_cpu(monkeypatch, amx=False, avx512_bf16=False)
    plain = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "plain"), echo=said.append, **FAST)
    assert any(line.startswith("dtype: float32 (auto: this CPU has no native bfloat16") for line in said), said
    manifest = read_manifest(tmp_path / "plain")
    assert manifest.precision["dtype"] == "float32" and manifest.precision["requested"] == "auto"
    assert manifest.precision["decode_attention"] == "torch"  # srdata's native kernel is for bfloat16 only
    assert manifest.settings["model"]["dtype"] == "float32"

    simulate_cpu(monkeypatch, amx=True, avx512_bf16=True)
    # The same command on a CPU with AMX would compute in bfloat16: refused, not mixed into the float32 run.
    with pytest.raises(RunDirError, match=r"(?s)other settings.*dtype"):
        srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "plain"), **FAST)
    result = CliRunner().invoke(main, ["score", str(data), "--model", str(tiny_gpt2), "--output", str(tmp_path / "fast"),
                                       "--device", "cpu", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "dtype: bfloat16 (auto: this CPU has AMX" in result.output
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    kernel = decode_attention_kernel("hf", "cpu", "bfloat16")  # srdata's own where the CPU has AVX512-BF16 (native.py)
    assert manifest["precision"] == {"dtype": "bfloat16", "requested": "auto", "reason": manifest["precision"]["reason"], "decode_attention": kernel}
    assert "AMX" in manifest["precision"]["reason"]
    # ... and the run really computed in bfloat16: close to the float32 values, not equal to them
    fast = pl.read_parquet(tmp_path / "fast" / "annotated.parquet")["ce_loss"].to_list()
    exact = plain.to_polars()["ce_loss"].to_list()
    assert fast != exact
    assert fast == pytest.approx(exact, rel=0.05)


def test_the_teach_pass_follows_the_scored_runs_dtype(tiny_gpt2, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    simulate_cpu(monkeypatch, amx=True, avx512_bf16=False)
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "run"), **FAST)
    for copy in ("bfloat16", "float32"):
        shutil.copytree(tmp_path / "run", tmp_path / copy)
    # Taught on a CPU whose own rule says float32, the teacher still computes in the run's
    # bfloat16, so excess_ce_loss = ce_loss - teacher_ce_loss compares like with like.
    simulate_cpu(monkeypatch, amx=False, avx512_bf16=False)
    said: list[str] = []
    srdata.teach(run=tmp_path / "run", teacher=str(tiny_gpt2), device="cpu", progress=False, echo=said.append)
    assert "teacher dtype: bfloat16 (auto: the scored run's dtype)" in said
    assert read_manifest(tmp_path / "run" / "teacher").precision["dtype"] == "bfloat16"
    taught = {}
    for name in ("run", "bfloat16", "float32"):
        if name != "run":
            srdata.teach(run=tmp_path / name, teacher=str(tiny_gpt2), device="cpu", dtype=name, progress=False)
        taught[name] = pl.read_parquet(tmp_path / name / "annotated.parquet")["teacher_ce_loss"].to_list()
    assert taught["run"] == taught["bfloat16"] != taught["float32"]
    # The pass cannot be resumed in another dtype (its shards would mix precisions); --overwrite redoes it.
    with pytest.raises(RunDirError, match=r"(?s)other settings.*dtype"):
        srdata.teach(run=tmp_path / "run", teacher=str(tiny_gpt2), device="cpu", dtype="float32", progress=False)
    srdata.teach(run=tmp_path / "run", teacher=str(tiny_gpt2), device="cpu", dtype="float32", overwrite=True, progress=False)
    assert pl.read_parquet(tmp_path / "run" / "annotated.parquet")["teacher_ce_loss"].to_list() == taught["float32"]
