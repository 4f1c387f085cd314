"""Object storage (issue 24): s3:// everywhere a user gives a path, against a real S3 server (SeaweedFS, tests/_s3.py).

Every output is compared with the same run on local folders; kills are real SIGKILLs of the
CLI; bad locations are checked at the CLI, where a user meets them (no traceback, nothing written).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

import srdata
from srdata.curriculum.cut import CurriculumError
from srdata.curriculum.export import export_curriculum
from srdata.curriculum.reader import load_curriculum
from tests._s3 import free_port

from .conftest import REPO_ROOT, write_jsonl

FAST = dict(device="cpu", dtype="float32", max_new_tokens=4, shard_size=2, progress=False)
CLI_FAST = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4", "--quiet"]


def rows(n: int = 6) -> list[dict]:
    return [{"instruction": f"Say {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(n)]


def bucket_fs(env: dict[str, str]):
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def put(env: dict[str, str], uri: str, local: Path) -> str:
    bucket_fs(env).put_file(str(local), uri.removeprefix("s3://"))
    return uri


def importable(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a CLI started in another folder (the tests run the checkout, wherever it is installed)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))}


def score_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srdata.cli", *args], capture_output=True, text=True, env=importable(env), cwd=cwd,
                          timeout=120)


def kill_after_shards(proc: subprocess.Popen, fs, manifest: str, seconds: float, shards: int = 2) -> bytes:
    """SIGKILL ``proc`` once ``manifest`` (a manifest.json in the bucket) records ``shards`` finished shards; its stderr.

    Example: ``err = kill_after_shards(proc, bucket_fs(env), f"{run}/manifest.json", seconds=60)``
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = sum(s["done"] for s in json.loads(fs.cat_file(manifest))["shards"])
        except (FileNotFoundError, ValueError):
            done = 0
        if done >= shards:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    return proc.communicate(timeout=30)[1]


def annotated(path_or_bytes) -> pl.DataFrame:
    return pl.read_parquet(path_or_bytes)


def test_score_export_and_load_through_s3_equal_the_local_run(tiny_gpt2, s3, tmp_path):
    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    local = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "run"), **FAST)
    remote = srdata.score(dataset=put(env, f"{bucket}/data/d.jsonl", data), model=str(tiny_gpt2), output=f"{bucket}/runs/a", **FAST)
    fs = bucket_fs(env)
    assert remote.output == f"{bucket}/runs/a"
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/runs/a"))
    assert names == ["annotated.parquet", "manifest.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert annotated(fs.cat_file(f"{bucket}/runs/a/annotated.parquet")).equals(local.to_polars())
    manifest = json.loads(fs.cat_file(f"{bucket}/runs/a/manifest.json"))
    assert manifest["status"] == "complete" and manifest["identity"]["dataset"] == local.manifest["identity"]["dataset"]
    assert "storage_options" not in json.dumps(manifest)

    # export: s3 run -> s3 folder, and the local run -> a local folder; then load both
    out_local = export_curriculum(tmp_path / "run")
    export_curriculum(f"{bucket}/runs/a", out=f"{bucket}/curricula/a")
    summary = json.loads(fs.cat_file(f"{bucket}/curricula/a/curriculum.json"))
    assert summary["source"]["run_dir"] == f"{bucket}/runs/a" and "publishing" not in summary
    for stage in summary["stages"]:
        assert fs.cat_file(f"{bucket}/curricula/a/{stage['file']}") == (out_local / stage["file"]).read_bytes()
    loaded, expected = load_curriculum(f"{bucket}/curricula/a"), load_curriculum(out_local)
    assert list(loaded) == list(expected)
    assert all(loaded[name].to_list() == expected[name].to_list() for name in expected)
    # a re-export cut otherwise is refused as for a local folder (nothing changed), --overwrite says what it replaces
    before = fs.cat_file(f"{bucket}/curricula/a/curriculum.json")
    with pytest.raises(CurriculumError, match=rf"{bucket}/curricula/a holds an earlier export cut with other settings \(.*stages 4 -> 3"):
        export_curriculum(f"{bucket}/runs/a", out=f"{bucket}/curricula/a", stages=3, keep=2)
    assert fs.cat_file(f"{bucket}/curricula/a/curriculum.json") == before
    said: list[str] = []
    export_curriculum(f"{bucket}/runs/a", out=f"{bucket}/curricula/a", stages=3, keep=2, overwrite=True, echo=said.append)
    assert said and said[0].startswith(f"replacing the earlier export in {bucket}/curricula/a (")
    assert json.loads(fs.cat_file(f"{bucket}/curricula/a/curriculum.json"))["settings"]["stages"] == 3
    # the default --out of a remote run is RUN/curriculum, in the bucket
    export_curriculum(f"{bucket}/runs/a")
    assert fs.exists(f"{bucket}/runs/a/curriculum/curriculum.json")
    assert list(load_curriculum(f"{bucket}/runs/a")) == list(expected)


def test_kill_mid_run_and_resume_from_s3(tiny_gpt2, s3, tmp_path):
    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows(12))
    uri = put(env, f"{bucket}/data/d.jsonl", data)
    out = f"{bucket}/runs/k"
    command = [sys.executable, "-m", "srdata.cli", "score", uri, "--model", str(tiny_gpt2), "--output", out,
               "--shard-size", "1", *CLI_FAST]
    proc = subprocess.Popen(command, env=importable(env), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fs = bucket_fs(env)
    err = kill_after_shards(proc, fs, f"{out}/manifest.json", seconds=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed mid-run: {err.decode()[-2000:]}"
    killed = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert killed["status"] == "running" and 2 <= sum(s["done"] for s in killed["shards"]) < 12
    assert fs.exists(f"{out}/.srdata.lock")  # the killed run's lock object stays: a store cannot drop it
    resumed = score_cli("score", uri, "--model", str(tiny_gpt2), "--output", out, "--shard-size", "1", *CLI_FAST[:-1], env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "no longer runs" in resumed.stderr  # the dead run's lock is replaced, and said so
    manifest = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert manifest["resumed"] and manifest["timings"]["rows_scored_this_call"] <= 12 - 2
    local = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "run"), **{**FAST, "shard_size": 1})
    assert annotated(fs.cat_file(f"{out}/annotated.parquet")).equals(local.to_polars())
    assert not fs.exists(f"{out}/.srdata.lock")


def test_a_damaged_remote_shard_is_recomputed_and_a_lock_of_another_machine_refused(tiny_gpt2, s3, tmp_path):
    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    out = f"{bucket}/runs/d"
    first = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=out, **FAST)
    fs = bucket_fs(env)
    shard = f"{out}/shards/shard-00001.parquet"
    body = bytearray(fs.cat_file(shard))
    body[len(body) // 2] ^= 0x01  # a real bit flip in the stored object
    fs.pipe_file(shard, bytes(body))
    messages: list[str] = []
    again = srdata.score(dataset=str(data), model=str(tiny_gpt2), output=out, echo=messages.append, **FAST)
    assert again.manifest["timings"]["rows_scored_this_call"] == 2  # that shard only
    assert annotated(fs.cat_file(f"{out}/annotated.parquet")).equals(first.to_polars())
    holder = {"pid": 1, "host": "another-machine", "command": "srdata score", "since": "2030-01-01 00:00:00", "token": "x"}
    fs.pipe_file(f"{out}/.srdata.lock", json.dumps(holder).encode())
    before = {p: fs.info(p)["ETag"] for p in fs.find(out)}
    done = score_cli("score", str(data), "--model", str(tiny_gpt2), "--output", out, "--shard-size", "2", *CLI_FAST, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "another-machine" in done.stderr and f"aws s3 rm {out}/.srdata.lock" in done.stderr
    assert "Traceback" not in done.stderr
    assert {p: fs.info(p)["ETag"] for p in fs.find(out)} == before  # nothing written


def test_interrupted_run_with_no_finished_shard_is_not_restarted_silently_under_other_settings(tiny_gpt2, tmp_path):
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", rows(4))
    model = tmp_path / "student"
    shutil.copytree(tiny_gpt2, model)
    (model / "model.safetensors").rename(tmp_path / "weights")  # the first start fails once the manifest is written
    run = tmp_path / "run"
    with pytest.raises(Exception):
        srdata.score(dataset=str(data), model=str(model), output=str(run), **{**FAST, "limit": 3})
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    (tmp_path / "weights").rename(model / "model.safetensors")
    with pytest.raises(ValueError, match=r"finished no shard, started with other settings:[\s\S]*max_new_tokens: 4 -> 2"):
        srdata.score(dataset=str(data), model=str(model), output=str(run), **{**FAST, "limit": 2, "max_new_tokens": 2})
    assert json.loads((run / "manifest.json").read_text())["settings"]["generation"]["max_new_tokens"] == 4  # untouched
    result = srdata.score(dataset=str(data), model=str(model), output=str(run), overwrite=True, **{**FAST, "limit": 2, "max_new_tokens": 2})
    assert result.manifest["status"] == "complete" and result.manifest["counts"]["rows_input"] == 2


PATH_OPTIONS = [
    ("score", ["score", "{data}", "--model", "{model}", "--output", "{uri}"]),
    ("score-data", ["score", "{uri}/d.jsonl", "--model", "{model}", "--output", "out"]),
    ("export-out", ["export", "{run}", "--out", "{uri}"]),
    ("export-run", ["export", "{uri}"]),
    ("rank", ["rank", "{uri}"]),
    ("report-out", ["report", "{run}", "--out", "{uri}"]),
    ("inspect", ["inspect", "{uri}"]),
    ("teach", ["teach", "{uri}", "--teacher", "{model}"]),
]
DISTILL_OPTIONS = [
    ("distill-output", ["--curriculum", "{run}/curriculum", "--output", "{uri}"]),
    ("distill-curriculum", ["--curriculum", "{uri}", "--output", "out"]),
    ("distill-data", ["--data", "{uri}/d.parquet", "--output", "out"]),
    ("distill-eval", ["--data", "{run}/annotated.parquet", "--eval-file", "{uri}/e.jsonl", "--output", "out"]),
]


@pytest.mark.parametrize("uri", ["s3:/bucket/x", "nosuch://bucket/x"], ids=["lost-slash", "unknown-scheme"])
@pytest.mark.parametrize("name,args", PATH_OPTIONS + DISTILL_OPTIONS, ids=[n for n, _ in PATH_OPTIONS + DISTILL_OPTIONS])
def test_no_path_option_turns_a_uri_into_a_local_folder(name, args, uri, tiny_gpt2, tmp_path, monkeypatch):
    """Every path option, through the real command line parser (in-process: 32 cases), in a fresh working folder."""
    from click.testing import CliRunner

    from srd_distill.cli import main as distill_main
    from srdata.cli import main as srdata_main

    data = write_jsonl(tmp_path / "d.jsonl", rows(2))
    run = tmp_path / "run"
    values = {"data": str(data), "model": str(tiny_gpt2), "uri": uri, "run": str(run)}
    argv = [a.format(**values) for a in args]
    if name.startswith("distill"):
        main, argv = distill_main, ["train", "--teacher", str(tiny_gpt2), "--student", str(tiny_gpt2), "--device", "cpu", *argv]
    else:
        main = srdata_main
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    done = CliRunner().invoke(main, argv)
    assert done.exit_code in (1, 2) and isinstance(done.exception, SystemExit), (done.output, done.exception)
    scheme = uri.split(":")[0]
    assert f"{scheme}:/" in done.output and ("lost a slash" in done.output or "not a storage srdata knows" in done.output), done.output
    assert not list(work.rglob("*")) and not (tmp_path / f"{scheme}:").exists()


def test_bad_locations_are_clear_errors_in_seconds(tiny_gpt2, s3, tmp_path):
    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows(2))
    fs = bucket_fs(env)

    def score(output: str, **changes: str | None) -> subprocess.CompletedProcess:
        run_env = {k: v for k, v in {**env, **changes}.items() if v is not None}
        started = time.monotonic()
        done = score_cli("score", str(data), "--model", str(tiny_gpt2), "--output", output, *CLI_FAST, env=run_env, cwd=tmp_path)
        assert time.monotonic() - started < 40
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        return done

    no_keys = score(f"{bucket}/runs/a", AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    assert "no credentials for S3" in no_keys.stderr and "AWS_ACCESS_KEY_ID" in no_keys.stderr
    missing = score("s3://no-such-bucket-srdata/runs/a")
    assert "bucket no-such-bucket-srdata does not exist" in missing.stderr
    silent = score(f"{bucket}/runs/a", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    assert "does not answer" in silent.stderr and "AWS_ENDPOINT_URL" in silent.stderr
    options = score(f"{bucket}/runs/a", AWS_ENDPOINT_URL=None, SRDATA_STORAGE_OPTIONS="{not json")
    assert "SRDATA_STORAGE_OPTIONS is not valid JSON" in options.stderr
    assert fs.find(bucket) == []  # nothing half-written anywhere
    assert not list(tmp_path.rglob("s3:"))
    # the endpoint from --storage-options instead of the environment
    flag = json.dumps({"endpoint_url": env["AWS_ENDPOINT_URL"]})
    ok = score_cli("score", str(data), "--model", str(tiny_gpt2), "--output", f"{bucket}/runs/b", *CLI_FAST, "--storage-options", flag,
                   env={k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert fs.exists(f"{bucket}/runs/b/annotated.parquet")


def test_srd_distill_from_an_s3_curriculum_into_s3_equals_the_local_run_and_resumes(tiny_gpt2, s3, tmp_path):
    from srd_distill.train import train

    bucket, env = s3
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=str(tmp_path / "run"), **{**FAST, "shard_size": 8})
    srdata.score(dataset=str(data), model=str(tiny_gpt2), output=f"{bucket}/run", **{**FAST, "shard_size": 8})
    local_curriculum = export_curriculum(tmp_path / "run")
    export_curriculum(f"{bucket}/run", out=f"{bucket}/cur")
    common = dict(teacher=str(tiny_gpt2), student=str(tiny_gpt2), batch_size=2, max_steps=1, epochs="1", device="cpu",
                  dtype="float32", log_every=1)
    local = train(curriculum=str(local_curriculum), output=str(tmp_path / "kd"), progress=False, **common)
    first = train(curriculum=f"{bucket}/cur", output=f"{bucket}/kd", stop_after_stage=0, progress=False, **common)
    assert not first.complete
    fs = bucket_fs(env)
    assert json.loads(fs.cat_file(f"{bucket}/kd/run.json"))["status"] == "stopped" and fs.exists(f"{bucket}/kd/stage-0/srd_checksums.json")
    messages: list[str] = []
    second = train(curriculum=f"{bucket}/cur", output=f"{bucket}/kd", progress=False, echo=messages.append, **common)
    assert second.complete and any("stage(s) 0 already finished" in m for m in messages)
    record = json.loads(fs.cat_file(f"{bucket}/kd/run.json"))
    assert record["status"] == "complete" and record["settings"]["output"] == f"{bucket}/kd"
    assert record["settings"]["curriculum"] == f"{bucket}/cur" and record["encoding"]["source"] == f"{bucket}/run/manifest.json"
    for stage in range(3):
        assert fs.cat_file(f"{bucket}/kd/stage-{stage}/model.safetensors") == (tmp_path / "kd" / f"stage-{stage}" / "model.safetensors").read_bytes()
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in lines.splitlines()]  # noqa: E731
    assert strip(fs.cat_file(f"{bucket}/kd/metrics.jsonl").decode()) == strip((tmp_path / "kd" / "metrics.jsonl").read_text())
    assert not fs.exists(f"{bucket}/kd/.srdata.lock")
