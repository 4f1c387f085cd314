"""A resume computes as the call that scored the finished shards did: per-replica records kept and compared.

A run started on GPU replicas (vLLM, bfloat16) and resumed on CPU replicas (transformers,
float32) would mix precisions in one table; the manifest of such an interrupted run is
written here as that GPU run would have written it (its replica records edited, the shard
checksums left valid), then resumed on this machine's CPU Ray replicas with ``auto``
settings: refused, nothing written. The same for the local engine and for ``srdata teach``.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

import srdata
from srdata.cli import main
from srdata.pipeline import score
from srdata.run.io import is_tool_file

from .conftest import DEMO_SAMPLE, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N_ROWS = 12  # 3 shards of 4 rows


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()][:N_ROWS]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def settings(data_file: Path, model: Path, out: Path, engine: str) -> dict:
    """--device, --backend and --dtype left at auto: what they resolve to is the node's."""
    extra = dict(num_replicas=1) if engine == "ray" else {}
    return dict(dataset=str(data_file), model=str(model), output=str(out), progress=False, engine=engine,
                max_new_tokens=4, shard_size=4, on_invalid="flag", **extra)


def interrupt(run: Path, undone: list[int]) -> dict:
    """Make ``run`` an interrupted run: ``undone`` shards not done (their files gone), no annotated table."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "running"
    manifest.pop("counts", None)
    for index in undone:
        (run / manifest["shards"][index]["file"]).unlink()
        manifest["shards"][index] = {**{k: manifest["shards"][index][k] for k in ("index", "file", "start", "stop")}, "done": False}
    (run / "annotated.parquet").unlink()
    return manifest


def files(run: Path) -> dict[str, bytes]:
    """Every file of the run but its manifest and the lock (whose holder note names the last command)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and not is_tool_file(p.name)}


def as_gpu_run(record: dict) -> dict:
    """The record a vLLM replica on a GPU node would have written."""
    return {**record, "backend": "vllm", "device": "cuda:0", "gpu_ids": ["0"], "dtype": "bfloat16",
            "dtype_reason": "auto: bfloat16 on a GPU", "versions": {**record["versions"], "vllm": "0.9.2"}}


def test_a_gpu_run_resumed_on_cpu_ray_replicas_is_refused_and_nothing_is_written(ray_runtime, tiny_gpt2, data_file, tmp_path):
    run = tmp_path / "run"
    complete = score(**settings(data_file, tiny_gpt2, run, "ray"))
    reference = complete.to_polars()
    cpu_records = complete.manifest["replicas"]
    assert complete.manifest["backend"] == cpu_records[0]["backend"] == "hf"  # reported by the replica, not the driver's guess
    assert complete.manifest["precision"]["dtype"] == cpu_records[0]["dtype"] != "auto"

    manifest = interrupt(run, undone=[2])
    manifest["replicas"] = [as_gpu_run(r) for r in cpu_records]
    manifest["backend"], manifest["precision"]["dtype"] = "vllm", "bfloat16"
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = files(run)

    args = ["score", str(data_file), "--model", str(tiny_gpt2), "--output", str(run), "--engine", "ray", "--num-replicas", "1",
            "--max-new-tokens", "4", "--shard-size", "4", "--on-invalid", "flag", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "refusing to resume: replica 0 on node" in out and "(hf, cpu," in out and "(vllm, cuda:0, bfloat16)" in out, out
    assert "backend hf vs vllm" in out and "device cpu vs cuda" in out and "--overwrite" in out and "Traceback" not in out
    assert files(run) == before  # no shard written, no annotated table
    kept = json.loads((run / "manifest.json").read_text())
    assert kept["replicas"] == manifest["replicas"] and kept["shards"] == manifest["shards"]  # the earlier records stay

    # Only the dtype differs (a CPU node with bf16 next to one without): refused the same way.
    manifest["replicas"] = [{**r, "dtype": "bfloat16" if r["dtype"] != "bfloat16" else "float32"} for r in cpu_records]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"refusing to resume: .*\(dtype (float32 vs bfloat16|bfloat16 vs float32)\)"):
        score(**settings(data_file, tiny_gpt2, run, "ray"))
    assert files(run) == before

    # The records of the call that really scored them: resumed; both calls' records in the manifest.
    manifest["replicas"] = cpu_records
    (run / "manifest.json").write_text(json.dumps(manifest))
    resumed = score(**settings(data_file, tiny_gpt2, run, "ray"))
    assert resumed.manifest["resumed"] and resumed.to_polars().equals(reference)
    assert resumed.manifest["replicas"][: len(cpu_records)] == cpu_records and len(resumed.manifest["replicas"]) > len(cpu_records)


def test_a_local_resume_with_another_backend_is_refused(tiny_gpt2, data_file, tmp_path):
    run = tmp_path / "run"
    score(**settings(data_file, tiny_gpt2, run, "local"))
    # A GPU machine whose dtype auto resolved as this one's (bfloat16 on GPUs and on CPUs with native bfloat16) picked vLLM.
    manifest = interrupt(run, undone=[1, 2])
    manifest["backend"] = "vllm"
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = files(run)
    with pytest.raises(ValueError, match=r"the local engine \(hf, .*\) would score next to the shards that the local engine "
                                         r"\(vllm, .*\) scored .*backend hf vs vllm.*--overwrite"):
        score(**settings(data_file, tiny_gpt2, run, "local"))
    assert files(run) == before and json.loads((run / "manifest.json").read_text()) == manifest  # nothing written


def test_teach_on_ray_records_its_replicas_and_refuses_a_resume_in_another_dtype(ray_runtime, tiny_llama, data_file, tmp_path):
    run = tmp_path / "run"
    score(**{**settings(data_file, tiny_llama, run, "local"), "device": "cpu", "dtype": "float32"})
    taught = srdata.teach(run=str(run), teacher=str(tiny_llama), engine="ray", num_replicas=1, device="cpu", dtype="float32", progress=False)
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    records = manifest["replicas"]
    assert records and all(r["backend"] == "hf" and r["device"] == "cpu" and r["dtype"] == "float32" for r in records)
    assert all(r["model"] == manifest["identity"]["teacher"] and r["node_id"] and r["versions"]["torch"] for r in records)
    assert manifest["backend"] == "hf" and taught.manifest["replicas"] == records
    run_manifest = json.loads((run / "manifest.json").read_text())
    assert "template" not in manifest and manifest["config"]["prompt"]["template"] == run_manifest["config"]["prompt"]["template"]

    interrupted = {**manifest, "status": "running"}  # killed before its last shard (the teacher folder has no annotated table)
    (run / "teacher" / interrupted["shards"][2]["file"]).unlink()
    interrupted["shards"][2] = {**{k: interrupted["shards"][2][k] for k in ("index", "file", "start", "stop")}, "done": False}
    interrupted["replicas"] = [{**r, "dtype": "bfloat16"} for r in records]
    (run / "teacher" / "manifest.json").write_text(json.dumps(interrupted))
    before = files(run)
    with pytest.raises(ValueError, match=r"refusing to resume: replica 0 .*dtype float32 vs bfloat16"):
        srdata.teach(run=str(run), teacher=str(tiny_llama), engine="ray", num_replicas=1, device="cpu", dtype="float32", progress=False)
    assert files(run) == before
    assert pl.read_parquet(run / "annotated.parquet")["teacher_ce_loss"].is_not_null().any()  # the finished pass's columns kept


def test_teach_on_ray_with_auto_computes_in_the_scored_runs_dtype(ray_runtime, tiny_llama, data_file, tmp_path):
    """--dtype auto on Ray: the replicas get the run's dtype, not what auto means on their node."""
    from srdata.backends import resolve_run_dtype

    here = resolve_run_dtype("hf", "cpu", "auto")[0]  # what a replica on this machine would pick by itself
    other = "float32" if here == "bfloat16" else "bfloat16"
    run = tmp_path / "run"
    score(**{**settings(data_file, tiny_llama, run, "local"), "device": "cpu", "dtype": other})
    said: list[str] = []
    srdata.teach(run=str(run), teacher=str(tiny_llama), engine="ray", num_replicas=1, device="cpu", progress=False, echo=said.append)
    assert f"teacher dtype: {other} (auto: the scored run's dtype)" in said, said
    manifest = json.loads((run / "teacher" / "manifest.json").read_text())
    assert manifest["precision"]["dtype"] == other and all(r["dtype"] == other for r in manifest["replicas"])
