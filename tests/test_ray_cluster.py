"""`srdata score --engine ray --ray-address` on a real multi-node Ray cluster (one host, several raylets).

The cluster (tests/_ray_cluster.py): a head with no CPUs, so the replicas run on worker
raylets, and two workers of 1 CPU each, started blind to one folder. The driver is the
real CLI in a subprocess. Worker nodes are killed for real (SIGKILL to the raylet and
everything under it). Skipped when Ray is not installed or the cluster cannot start
(a failure under SRDATA_REQUIRE_REAL=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from srdata.pipeline import score

from .conftest import DEMO_SAMPLE, write_jsonl
from .real_models import unavailable
from .test_ray_engine import assert_same_run

N_ROWS, SHARD = 48, 3  # 16 shards: a node is killed while many are still to do (24 rows raced: decoding got faster)
SETTINGS = dict(max_new_tokens=6, shard_size=SHARD, device="cpu", dtype="float32", on_invalid="flag")


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'srdata[ray]'")
    from ._ray_cluster import RayCluster

    ray_cluster = RayCluster(cpus_per_worker=1)
    try:
        ray_cluster.start(workers=2)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        ray_cluster.stop()
        unavailable(f"a multi-node Ray cluster could not start on this host: {err}")
    yield ray_cluster
    ray_cluster.stop()


@pytest.fixture(scope="module")
def student(cluster, tiny_gpt2) -> Path:
    """The tiny model in a folder every node sees (the driver passes it as a relative path)."""
    return Path(shutil.copytree(tiny_gpt2, cluster.dir / "models" / "student"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()][:N_ROWS]
    rows[7] = {**rows[7], "instruction": ""}  # flagged, as locally
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def local_run(student, data_file, tmp_path_factory) -> Path:
    """The local engine's run, with the same relative --model as the cluster runs (the path is in the settings)."""
    out = tmp_path_factory.mktemp("local") / "run"
    here = os.getcwd()
    os.chdir(student.parent)
    try:
        score(dataset=str(data_file), model=student.name, output=str(out), progress=False, **SETTINGS)
    finally:
        os.chdir(here)
    return out


def cli(cluster, data_file: Path, model: str, out: Path, *extra: str, cwd: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "srdata.cli", "score", str(data_file), "--model", model, "--output", str(out), "--engine", "ray",
            "--ray-address", cluster.address, "--num-replicas", "2", "--max-new-tokens", "6", "--shard-size", str(SHARD),
            "--device", "cpu", "--dtype", "float32", "--on-invalid", "flag", "-q", *extra]
    return subprocess.Popen(args, env=cluster.env, cwd=cwd or cluster.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shards_done(out: Path) -> int:
    try:
        return sum(s["done"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_shards(run: subprocess.Popen, out: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while shards_done(out) < n:
        assert run.poll() is None, f"the run ended before {n} shard(s) were done: {run.stdout.read()}"
        assert time.monotonic() < deadline, f"no {n} shard(s) done within {timeout} s"
        time.sleep(0.2)


def finish(run: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        output, _ = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        output, _ = run.communicate()
        pytest.fail(f"the run did not end within {timeout} s (stalled?):\n{output}")
    return run.returncode, output


def ensure_workers(cluster, n: int) -> None:
    while len(cluster.workers) < n:
        cluster.add_worker()


def test_model_folder_a_node_cannot_see_fails_naming_the_node(cluster, tiny_gpt2, data_file, tmp_path):
    if not cluster.blind:
        unavailable("no private mount namespace here (unshare, root): every node sees every folder")
    ensure_workers(cluster, 1)
    hidden = Path(shutil.copytree(tiny_gpt2, cluster.hidden / "student"))  # the driver sees it; the workers see an empty tmpfs
    out = tmp_path / "run"
    code, output = finish(cli(cluster, data_file, str(hidden), out))
    assert code == 1, output
    assert f"the model folder {hidden} is not visible on this node" in output, output
    node = next(iter(cluster.workers))[:8] if len(cluster.workers) == 1 else None
    assert "on node " in output and "(host " in output and (node is None or node in output), output
    assert "Traceback" not in output
    assert not list((out / "shards").glob("shard-*.parquet"))  # nothing scored


def test_worker_node_killed_mid_run_same_output_as_local(cluster, student, data_file, local_run, tmp_path):
    ensure_workers(cluster, 2)
    out = tmp_path / "run"
    run = cli(cluster, data_file, student.name, out, cwd=student.parent)  # a relative --model: resolved on the driver
    wait_for_shards(run, out, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    nodes = {r["node_id"] for r in manifest.get("replicas", [])}
    victim = next(n for n in nodes if n in cluster.workers)
    assert cluster.kill_workers(victim) >= 2  # the raylet and at least the replica's worker process
    code, output = finish(run)
    assert code == 0, output
    assert "was lost" in output, output  # the kill hit a replica holding shards
    assert_same_run(out, local_run)
    annotated = pl.read_parquet(out / "annotated.parquet")
    assert annotated["srd_id"].to_list() == list(range(N_ROWS))  # complete, no duplicates
    replicas = json.loads((out / "manifest.json").read_text())["replicas"]
    assert len({r["node_id"] for r in replicas}) == 2 and all(r["model"]["name"] == str(student) for r in replicas)
    assert {r["backend"] for r in replicas} == {"hf"} and all(r["device"] == "cpu" and r["versions"]["torch"] for r in replicas)


def test_losing_every_worker_waits_then_fails_clearly_and_resumes(cluster, student, data_file, local_run, tmp_path):
    ensure_workers(cluster, 1)
    out = tmp_path / "run"
    run = cli(cluster, data_file, student.name, out, "--wait-for-resources", "4", cwd=student.parent)
    wait_for_shards(run, out, 1)
    cluster.kill_workers(*cluster.workers)
    code, output = finish(run, timeout=180)  # not a silent stall
    assert code == 1, output
    assert "waiting for a node with 1 CPU to host a replica" in output and "s left of --wait-for-resources 4" in output, output
    assert "no node of the Ray cluster can host a replica (1 CPU" in output and "run the same command again to resume" in output
    assert "Traceback" not in output
    done = shards_done(out)
    assert 1 <= done < N_ROWS // SHARD

    cluster.add_worker()  # the node comes back: the same command resumes and finishes
    code, output = finish(cli(cluster, data_file, student.name, out, "--wait-for-resources", "4", cwd=student.parent))
    assert code == 0, output
    assert_same_run(out, local_run)
