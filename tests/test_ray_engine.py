"""`srdata score --engine ray`: same output as the local engine, actor faults, resume.

The Ray tests start one local Ray runtime for the module (2 CPUs, 2 actors) and skip
cleanly when Ray is not installed; the missing-extra test runs everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from srdata.cli import main
from srdata.config import build_config, result_settings
from srdata.pipeline import score

from .conftest import DEMO_SAMPLE, write_jsonl

# Ray's own modules trip deprecation warnings; nothing srdata calls.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

FAST = dict(max_new_tokens=6, shard_size=5, device="cpu", dtype="float32", on_invalid="flag")
N_ROWS = 20  # 4 shards of 5 rows


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Real alpaca-layout rows; one has an empty instruction (flagged, per --on-invalid flag)."""
    rows = [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()][:N_ROWS]
    rows[7] = {**rows[7], "instruction": ""}
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def local_run(tiny_gpt2, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    score(dataset=str(data_file), model=str(tiny_gpt2), output=str(out), progress=False, **FAST)
    return out


def ray_score(data_file, model, out, **kw):
    return score(dataset=str(data_file), model=str(model), output=str(out), progress=False, engine="ray", num_replicas=2, **{**FAST, **kw})


def assert_same_run(run: Path, reference: Path) -> None:
    """Annotated table and every shard file equal; the manifests agree on settings and counts."""
    assert pl.read_parquet(run / "annotated.parquet").equals(pl.read_parquet(reference / "annotated.parquet"))
    shards = sorted(p.name for p in (reference / "shards").glob("shard-*.parquet"))
    assert shards and sorted(p.name for p in (run / "shards").glob("*")) == shards  # no temp files left behind
    for name in shards:
        assert pl.read_parquet(run / "shards" / name).equals(pl.read_parquet(reference / "shards" / name)), name
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (run, reference))
    assert ours["status"] == "complete" and all(s["done"] for s in ours["shards"])
    assert ours["config_hash"] == theirs["config_hash"] and ours["counts"] == theirs["counts"]


def test_engine_settings_do_not_change_the_resume_hash():
    local = build_config({"dataset": "d.jsonl", "model": "m", "output": "o"})
    remote = build_config({"dataset": "d.jsonl", "model": "m", "output": "o", "engine": "ray", "ray_address": "auto",
                           "num_replicas": 4, "gpus_per_replica": 1})
    assert remote.engine.name == "ray" and remote.engine.num_replicas == 4
    assert result_settings(local) == result_settings(remote)


def test_engine_ray_without_ray_names_the_extra(tiny_gpt2, data_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(main, ["score", str(data_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "run"),
                                       "--engine", "ray", "--max-new-tokens", "4", "--device", "cpu", "--on-invalid", "flag", "-q"])
    assert result.exit_code == 1, result.output
    assert "--engine ray needs Ray" in result.output and "pip install 'srdata[ray]'" in result.output


def test_replicas_fit_the_cluster():
    from srdata.engines.ray import _replicas

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0, "GPU": 2.0}

    engine = build_config({"dataset": "d", "model": "m", "output": "o", "engine": "ray"}).engine
    assert _replicas(FakeRay, engine, n_shards=100, strict=True) == 8  # default: as many as the CPUs fit
    assert _replicas(FakeRay, engine, n_shards=3, strict=True) == 3  # never more actors than shards
    gpus = engine.model_copy(update={"gpus_per_replica": 1.0})
    assert _replicas(FakeRay, gpus, n_shards=100, strict=True) == 2
    with pytest.raises(ValueError, match="lower --num-replicas"):
        _replicas(FakeRay, gpus.model_copy(update={"num_replicas": 3}), n_shards=100, strict=True)
    assert _replicas(FakeRay, gpus.model_copy(update={"num_replicas": 3}), n_shards=100, strict=False) == 3  # a cluster may grow


def test_ray_output_identical_to_local(ray_runtime, tiny_gpt2, data_file, local_run, tmp_path):
    out = tmp_path / "run"
    args = ["score", str(data_file), "--model", str(tiny_gpt2), "--output", str(out), "--engine", "ray", "--num-replicas", "2",
            "--gpus-per-replica", "0", "--max-new-tokens", "6", "--shard-size", "5", "--device", "cpu", "--dtype", "float32",
            "--on-invalid", "flag", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert_same_run(out, local_run)
    annotated = pl.read_parquet(out / "annotated.parquet")
    assert annotated["srd_id"].to_list() == list(range(N_ROWS))
    assert annotated.filter(pl.col("srd_id") == 7)["invalid_reason"].item()  # per-row failure flagged, as locally
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["engine"]["engine"] == "ray" and manifest["timings"]["rows_scored_this_call"] == N_ROWS - 1
    replicas = manifest["replicas"]  # resolved in each actor, where the work ran
    # Each replica that reported is recorded once (a shard goes only to a replica that reported). Both
    # usually do, but on a loaded machine one replica can score all 4 shards before the other has loaded.
    indices = [r["replica"] for r in replicas]
    assert indices and sorted(set(indices)) == sorted(indices) and set(indices) <= {0, 1}
    for record in replicas:
        assert record["node_id"] and record["node_ip"] and record["pid"] != os.getpid()
        assert record["backend"] == "hf" and record["device"] == "cpu" and record["versions"]["srdata"]
        assert record["model"] == json.loads((local_run / "manifest.json").read_text())["identity"]["model"]


def test_killed_actor_is_retried_without_losing_or_duplicating_rows(ray_runtime, tiny_gpt2, data_file, local_run, tmp_path, monkeypatch):
    from srdata.engines import ray as ray_engine

    marker = str(tmp_path / "actor-died")

    class DiesOnce(ray_engine.ShardScorer):
        """Exits the actor's process while scoring shard 1, the first time only (a marker file)."""

        def score(self, index, start, stop, rows):
            if index == 1:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass  # the retry, on the restarted actor
                else:
                    os._exit(1)
            return super().score(index, start, stop, rows)

    monkeypatch.setattr(ray_engine, "ShardScorer", DiesOnce)
    out = tmp_path / "run"
    ray_score(data_file, tiny_gpt2, out)
    assert os.path.exists(marker), "the actor never died: the test did not exercise a fault"
    annotated = pl.read_parquet(out / "annotated.parquet")
    assert annotated["srd_id"].to_list() == list(range(N_ROWS))  # complete, no duplicates
    assert_same_run(out, local_run)


def test_resume_skips_finished_shards(ray_runtime, tiny_gpt2, data_file, local_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(local_run, out)  # a local run, two shards of which were lost
    for name in ("shard-00001.parquet", "shard-00003.parquet"):
        (out / "shards" / name).unlink()
    (out / "annotated.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    result = ray_score(data_file, tiny_gpt2, out)
    assert result.manifest["resumed"] is True
    assert result.manifest["timings"]["rows_scored_this_call"] == 10 - 1  # shards 1 and 3 only (row 7 is flagged)
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in kept} == kept  # finished shards untouched
    assert_same_run(out, local_run)

    again = ray_score(data_file, tiny_gpt2, out)  # everything done: no actor is started
    assert again.manifest["timings"]["rows_scored_this_call"] == 0


def test_device_is_checked_on_the_replicas_not_the_driver(ray_runtime, tiny_gpt2, data_file, tmp_path):
    """--device cuda is not refused by the driver; each replica checks its node and fails at once, naming it."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"replica \d on node .*\(host .*--device cuda: torch sees no CUDA GPU.*--gpus-per-replica 1"):
        ray_score(data_file, tiny_gpt2, tmp_path / "run", device="cuda")
    assert not list((tmp_path / "run" / "shards").glob("shard-*"))
    assert time.monotonic() - started < 120  # refused by the check, not after a model load


def test_no_node_for_a_replica_waits_visibly_then_fails(ray_runtime, tiny_gpt2, data_file, tmp_path, caplog):
    """--gpus-per-replica 1 on a cluster without GPUs: the same wait, message and error from the API and the CLI."""
    from srdata.engines.cluster import ResourcesUnavailableError

    caplog.set_level(logging.WARNING, logger="srdata.engines.cluster")
    started = time.monotonic()
    with pytest.raises(ResourcesUnavailableError, match=r"no node of the Ray cluster can host a replica \(1 GPU and 1 CPU"):
        ray_score(data_file, tiny_gpt2, tmp_path / "api", gpus_per_replica=1, wait_for_resources=2)
    assert time.monotonic() - started >= 2  # it waited, then gave up
    assert "waiting for a node with 1 GPU and 1 CPU to host a replica" in caplog.text and "s left of --wait-for-resources 2" in caplog.text

    result = CliRunner().invoke(main, ["score", str(data_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "cli"),
                                       "--engine", "ray", "--gpus-per-replica", "1", "--wait-for-resources", "1", "--device", "cpu",
                                       "--on-invalid", "flag", "-q"])
    assert result.exit_code == 1 and "no node of the Ray cluster can host a replica (1 GPU and 1 CPU" in result.output, result.output
    assert "--wait-for-resources 1 s" in result.output and "Traceback" not in result.output


def test_replicas_that_differ_are_refused():
    from srdata.engines.replica import package_versions, replica_mismatch

    first = {"replica": 0, "node_ip": "10.0.0.1", "hostname": "a", "node_id": "aaaa1111", "backend": "hf", "device": "cuda:0",
             "model": {"name": "/m", "fingerprint": "f00d"}, "versions": package_versions("hf")}
    assert replica_mismatch({**first, "replica": 1, "device": "cuda:1"}, first, {"name": "/m", "fingerprint": "f00d"}) is None
    other = {**first, "replica": 1, "node_ip": "10.0.0.2", "hostname": "b"}
    assert "sees another model at /m (fingerprint beef) than the driver (f00d)" in replica_mismatch(
        {**other, "model": {"name": "/m", "fingerprint": "beef"}}, first, {"name": "/m", "fingerprint": "f00d"})
    assert "uses the vllm backend, replica 0 on node 10.0.0.1 (host a, node aaaa1111) the hf backend" in replica_mismatch(
        {**other, "backend": "vllm"}, first, None)
    assert "runs on cpu" in replica_mismatch({**other, "device": "cpu"}, first, None)
    # --dtype auto resolves per node: a CPU node with bf16 next to one without would mix precisions
    cpu_bf16 = {**first, "device": "cpu", "dtype": "bfloat16", "dtype_reason": "auto: the CPU has AVX512-BF16"}
    cpu_fp32 = {**other, "device": "cpu", "dtype": "float32", "dtype_reason": "auto: no fast bfloat16 path"}
    assert "computes in float32 (auto: no fast bfloat16 path), replica 0 on node 10.0.0.1 (host a, node aaaa1111) in bfloat16" \
        in replica_mismatch(cpu_fp32, cpu_bf16, None)
    newer = {**other, "versions": {**first["versions"], "transformers": "99.0"}}
    assert f"transformers 99.0 vs {first['versions']['transformers']}" in replica_mismatch(newer, first, None)


def test_relative_model_reaches_the_replicas_as_an_absolute_path(tiny_gpt2, monkeypatch):
    from srdata.engines.replica import absolute_model, check_here

    monkeypatch.chdir(tiny_gpt2.parent)
    assert absolute_model(tiny_gpt2.name) == str(tiny_gpt2.resolve())
    assert absolute_model("org/a-hub-id") == "org/a-hub-id"  # no such folder: the nodes download it
    config = build_config({"dataset": "d", "model": "/nowhere/student", "output": "o", "device": "cpu"})
    assert "the model folder /nowhere/student is not visible on this node" in check_here(config, 0)


def test_ray_noise_is_filtered_and_real_warnings_pass():
    from srdata.engines.noise import KnownRayNoise

    def passes(message: str) -> bool:
        return KnownRayNoise().filter(logging.LogRecord("ray", logging.WARNING, "", 0, message, None, None))

    assert not passes("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert passes("Failed to connect to GCS at 10.0.0.1:6379")
