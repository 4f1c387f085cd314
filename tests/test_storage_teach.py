"""``srdata teach`` on a run in object storage (issue 24), and ``srd-distill --teacher-logits s3://RUN``, against a real
S3 server (SeaweedFS, tests/_s3.py).

Each remote result is compared with the same commands on local folders; the kill is a real SIGKILL of the CLI; the
damaged shard a real bit flip in the stored object.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import srdata
from srdata.teacher_pass import TeachError

from .conftest import corpus, write_jsonl
from .test_storage import bucket_fs, importable, kill_after_shards, put

FAST = dict(device="cpu", dtype="float32", max_new_tokens=4, progress=False)
TEACH = dict(device="cpu", dtype="float32", batch_size=2, progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small random Llama with the tiny student's tokenizer (trained on the same corpus), other weights."""
    from srdata.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "llama", corpus(), arch="llama", hidden_size=64, num_layers=2, seed=1)


def rows(n: int) -> list[dict]:
    return [{"instruction": f"Write {i} in words, then {i + 1}.", "input": "", "output": f"number {i} then {i + 1}"} for i in range(n)]


def stored_shards(fs, folder: str) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.glob(f"{folder}/teacher/shards/shard-*.parquet"))}


def local_shards(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "teacher" / "shards").glob("shard-*.parquet"))}


def test_teach_into_s3_equals_teach_on_the_local_copy_and_srd_distill_trains_from_it(tiny_llama, teacher, s3, tmp_path):
    from srd_distill.train import train

    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows(6))
    run = f"{bucket}/runs/a"
    srdata.score(dataset=str(data), model=str(tiny_llama), output=str(tmp_path / "run"), shard_size=2, **FAST)
    srdata.score(dataset=put(env, f"{bucket}/data/d.jsonl", data), model=str(tiny_llama), output=run, shard_size=2, **FAST)
    local = srdata.teach(run=tmp_path / "run", teacher=str(teacher), top_k=4, **TEACH)
    said: list[str] = []
    remote = srdata.teach(run=run, teacher=str(teacher), top_k=4, echo=said.append, **TEACH)
    fs = bucket_fs(env)

    assert remote.run == run and remote.teacher_dir == f"{run}/teacher"
    assert said[-1] == f"wrote teacher_ce_loss and excess_ce_loss into {run}/annotated.parquet; top-4 log-probs in {run}/teacher/shards"
    # the teacher's columns and shards: the same values and the same bytes as on the local run
    assert pl.read_parquet(fs.cat_file(f"{run}/annotated.parquet")).equals(pl.read_parquet(tmp_path / "run" / "annotated.parquet"))
    assert stored_shards(fs, run) == local_shards(tmp_path / "run") and len(local_shards(tmp_path / "run")) == 3
    manifest = json.loads(fs.cat_file(f"{run}/teacher/manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"] == local.manifest["counts"]
    assert [(s["sha256"], s["bytes"]) for s in manifest["shards"]] == [(s["sha256"], s["bytes"]) for s in local.manifest["shards"]]
    for shard in manifest["shards"]:  # what the stored manifest vouches for is what is stored
        assert hashlib.sha256(fs.cat_file(f"{run}/teacher/{shard['file']}")).hexdigest() == shard["sha256"]
    run_manifest = json.loads(fs.cat_file(f"{run}/manifest.json"))
    assert run_manifest["teacher"]["top_k"] == 4 and run_manifest["teacher"]["folder"] == "teacher"
    assert not fs.exists(f"{run}/.srdata.lock") and "storage_options" not in json.dumps(manifest)
    # the same pass again: a resume with nothing to do, the stored shards downloaded and checked, none rewritten
    etags = {p: fs.info(p)["ETag"] for p in fs.find(f"{run}/teacher/shards")}
    again = srdata.teach(run=run, teacher=str(teacher), top_k=4, **TEACH)
    assert again.manifest["resumed"] and {p: fs.info(p)["ETag"] for p in fs.find(f"{run}/teacher/shards")} == etags
    # another teacher is refused, naming the run by its URI; nothing is written
    with pytest.raises(TeachError, match=f"{run} already holds the teach pass of .*--overwrite"):
        srdata.teach(run=run, teacher=str(tiny_llama), top_k=4, **TEACH)

    # srd-distill --teacher-logits from the bucket: the same steps as from the local run
    common = dict(student=str(tiny_llama), epochs="1", max_steps=2, device="cpu", dtype="float32", batch_size=2, log_every=1,
                  checkpoint_interval=0, progress=False)
    train(teacher_logits=str(tmp_path / "run"), data=str(tmp_path / "run" / "annotated.parquet"), output=str(tmp_path / "kd"), **common)
    result = train(teacher_logits=run, data=f"{run}/annotated.parquet", output=str(tmp_path / "kd-s3"), **common)
    assert result.complete
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in path.read_text().splitlines()]  # noqa: E731
    metrics = strip(tmp_path / "kd-s3" / "metrics.jsonl")
    assert [m["event"] for m in metrics].count("train") == 2 and metrics == strip(tmp_path / "kd" / "metrics.jsonl")
    final = lambda folder: sorted(folder.glob("**/model.safetensors"))[-1].read_bytes()  # noqa: E731
    assert final(tmp_path / "kd-s3") == final(tmp_path / "kd")
    record = json.loads((tmp_path / "kd-s3" / "run.json").read_text())
    assert record["settings"]["teacher_logits"] == run and record["inputs"]["teacher_logits"]["top_k"] == 4


def test_a_killed_teach_pass_on_s3_resumes_from_the_verified_shards(tiny_llama, teacher, s3, tmp_path):
    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows(10))
    run = f"{bucket}/runs/k"
    srdata.score(dataset=str(data), model=str(tiny_llama), output=str(tmp_path / "run"), shard_size=1, **FAST)
    srdata.score(dataset=str(data), model=str(tiny_llama), output=run, shard_size=1, **FAST)
    fs = bucket_fs(env)
    scored = {name: fs.cat_file(f"{run}/{name}") for name in ("manifest.json", "annotated.parquet")}
    args = [sys.executable, "-m", "srdata.cli", "teach", run, "--teacher", str(teacher), "--top-k", "4", "--device", "cpu",
            "--dtype", "float32", "--batch-size", "1"]
    proc = subprocess.Popen([*args, "-q"], env=importable(env), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = kill_after_shards(proc, fs, f"{run}/teacher/manifest.json", seconds=120)
    assert proc.returncode == -signal.SIGKILL, f"the teach pass ended before it could be killed: {err.decode()[-2000:]}"

    # nothing half-written is visible: the run as scored, the teacher manifest running, each shard it records as stored
    assert {name: fs.cat_file(f"{run}/{name}") for name in scored} == scored
    killed = json.loads(fs.cat_file(f"{run}/teacher/manifest.json"))
    finished = [s for s in killed["shards"] if s["done"]]
    assert killed["status"] == "running" and 2 <= len(finished) < 10
    for shard in finished:
        assert hashlib.sha256(fs.cat_file(f"{run}/teacher/{shard['file']}")).hexdigest() == shard["sha256"]
    assert fs.exists(f"{run}/.srdata.lock")  # the killed pass's lock object stays: a store cannot drop it
    # a real bit flip in one finished shard: the resume checks every one by its SHA-256 and recomputes that one
    damaged = f"{run}/teacher/{finished[0]['file']}"
    body = bytearray(fs.cat_file(damaged))
    body[len(body) // 2] ^= 0x01
    fs.pipe_file(damaged, bytes(body))

    resumed = subprocess.run(args, env=importable(env), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "no longer runs" in resumed.stderr  # the dead pass's lock is replaced, and said so
    assert f"{damaged} is missing or does not match the checksum in the manifest: recomputing it" in resumed.stderr
    assert f"next: srdata export {run} --rank-by teachable" in resumed.stdout
    srdata.teach(run=tmp_path / "run", teacher=str(teacher), top_k=4, **{**TEACH, "batch_size": 1})
    assert stored_shards(fs, run) == local_shards(tmp_path / "run")
    assert pl.read_parquet(fs.cat_file(f"{run}/annotated.parquet")).equals(pl.read_parquet(tmp_path / "run" / "annotated.parquet"))
    manifest = json.loads(fs.cat_file(f"{run}/teacher/manifest.json"))
    assert manifest["status"] == "complete" and manifest["resumed"] is True
    assert manifest["timings"]["total_seconds"] > 0 and not fs.exists(f"{run}/.srdata.lock")


def test_teach_on_s3_bad_locations_are_clear_errors(tiny_llama, teacher, s3, tmp_path):
    bucket, env = s3
    cli = lambda *a: subprocess.run([sys.executable, "-m", "srdata.cli", "teach", *a, "--teacher", str(teacher), "--device", "cpu"],  # noqa: E731
                                    env=importable(env), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    empty = cli(f"{bucket}/runs/none")
    assert empty.returncode == 1 and f"{bucket}/runs/none holds no scored run" in empty.stderr and "Traceback" not in empty.stderr
    missing = cli("s3://no-such-bucket-srdata/runs/a")
    assert missing.returncode == 1 and "bucket no-such-bucket-srdata does not exist" in missing.stderr
    assert bucket_fs(env).find(bucket) == []  # nothing written, not even a lock
    assert not list(tmp_path.rglob("s3:"))
