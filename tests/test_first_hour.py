"""A newcomer's first hour (issue 27): progress inside a shard, Ctrl-C that keeps rows and says
what it kept, truncation said out loud, and fast failures before the data is loaded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import write_jsonl

QUESTIONS = [
    ("Say yes.", "Yes."),
    ("Count from one to twenty, in words, separated by commas.", "one, two, three, four, five, six, seven, eight"),
    ("What is the capital of France? Answer in one word.", "Paris"),
    ("Write a long poem about the sea and the wind and the sailors who cross it.", "The sea is wide."),
    ("Name a colour.", "Blue"),
    ("List the days of the week, one per line.", "Monday\nTuesday\nWednesday"),
]


def _rows(n: int) -> list[dict]:
    return [{"instruction": QUESTIONS[i % len(QUESTIONS)][0], "output": QUESTIONS[i % len(QUESTIONS)][1]} for i in range(n)]


def _config(model: Path, tmp_path: Path, **extra):
    from srdata.config import build_config

    settings = dict(dataset=str(tmp_path / "d.jsonl"), model=str(model), output=str(tmp_path / "r"), device="cpu", dtype="float32")
    return build_config({**settings, **extra})


# ---------------------------------------------------------------------------- progress
def test_progress_counts_rows_inside_a_shard(tiny_llama, tmp_path):
    """Rows reach the progress callback batch by batch, long before the shard (8 rows, batches of 2) is done."""
    from srdata.run.folder import Shard
    from srdata.shard import LoadedStudent
    from srdata.steps.dataset import ColumnMapping

    config = _config(tiny_llama, tmp_path, batch_size=2, max_new_tokens=4, shard_size=8)
    student = LoadedStudent(config, ColumnMapping("instruction", "output"), "alpaca")
    calls: list[tuple[int, int]] = []
    rows = {k: [r[k] for r in _rows(8)] for k in ("instruction", "output")}
    frame = student(rows, Shard(0, 0, 8), lambda r, t: calls.append((r, t)))
    row_calls = [r for r, _ in calls if r]
    assert frame.height == 8 and sum(row_calls) == 8
    assert len(row_calls) >= 4, f"rows arrived in {row_calls}: not inside the shard"
    assert calls.index(next(c for c in calls if c[0])) < len(calls) - 1  # the first rows come before the shard's last report


def test_rows_are_counted_as_they_stop_and_an_interrupt_keeps_them(smollm2):
    """One batch of real answers of different lengths: each row is counted the decode step it
    stops, not when the batch ends (the newcomer's 30-row run sat at 0% for ten minutes); and a
    KeyboardInterrupt in the middle of decoding (raised from the progress hook, where a signal
    handler's would surface) carries the rows that had stopped, equal to the uninterrupted run's."""
    from srdata.backends.base import GenerationParams
    from srdata.backends.hf import HFBackend
    from srdata.backends.live import BackendInterrupted

    backend = HFBackend.from_pretrained(smollm2, device="cpu", dtype="float32", batch_size=8)
    tok = backend.tokenizer
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[2], QUESTIONS[4]]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q, _ in questions]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    references = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in questions]
    params = GenerationParams(16, stop_token_ids=(tok.eos_token_id,))
    calls: list[tuple[int, int]] = []
    losses, full = backend.score_and_generate(prompts, references, params, lambda r, t: calls.append((r, t)))
    assert any(g.finish_reason == "stop" for g in full) and any(g.finish_reason == "length" for g in full), full
    last_tokens = max(i for i, (r, t) in enumerate(calls) if t and not r)
    assert sum(r for r, _ in calls[:last_tokens]) >= 1, f"every row was counted after decoding ended: {calls}"
    assert sum(r for r, _ in calls) == len(prompts)

    def stop_at_first_row(rows: int, tokens: int) -> None:
        if rows:
            raise KeyboardInterrupt

    with pytest.raises(BackendInterrupted) as caught:
        backend.score_and_generate(prompts, references, params, stop_at_first_row)
    done = caught.value.generations
    assert 1 <= len(done) < len(prompts)
    for i, generation in done.items():
        assert generation.token_ids == full[i].token_ids and generation.text == full[i].text
        assert caught.value.losses[i] == pytest.approx(losses[i], rel=1e-4)


# ---------------------------------------------------------------------------- Ctrl-C, real process
def _score_cmd(data: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "srdata.cli", "score", str(data), "--model", str(model), "--output", str(out), "--device", "cpu",
            "--dtype", "float32", "--batch-size", "2", "--max-new-tokens", "16", "--shard-size", "100"]


@pytest.mark.slow  # three real SmolLM2 runs (interrupted, resumed, uninterrupted): ~100 s on an idle 2-core machine
def test_sigint_during_generation_keeps_exactly_the_rows_it_reports(smollm2, tmp_path):
    """SIGINT once the bar shows rows: the process ends within seconds, says how many rows it kept,
    those rows are on disk (checksummed), and the rerun gives what an uninterrupted run gives."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    out = tmp_path / "run"
    proc = subprocess.Popen(_score_cmd(data, smollm2, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(chunk) for chunk in iter(lambda: proc.stderr.read1(4096), b"")], daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not re.search(rb"scoring:\s+\d+%\|[^|]*\|\s*[1-2]/4", bytes(seen)):
        assert proc.poll() is None, f"the run ended before rows showed: {bytes(seen).decode()[-2000:]}"
        assert time.monotonic() < deadline, "no row showed in the progress bar"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert proc.wait(timeout=60) == 130
    assert time.monotonic() - sent < 30
    reader.join(timeout=10)
    message = bytes(seen).decode()
    kept = re.search(r"interrupted: kept (\d+) of 4 rows in (\S+) \(0 of 1 shards complete; (\d+) rows of shard 0 in (\S+)\)", message)
    assert kept, message[-2000:]
    assert "the finished shards are saved" not in message
    n = int(kept.group(1))
    assert 1 <= n < 4 and int(kept.group(3)) == n
    partial = pl.read_parquet(out / kept.group(4))
    assert partial.height == n and partial["ce_loss"].is_not_null().all() and partial["student_output"].is_not_null().all()
    record = json.loads((out / "manifest.json").read_text())["shards"][0]["partial"]
    assert record["rows"] == n and record["file"] == kept.group(4)

    resumed = subprocess.run(_score_cmd(data, smollm2, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{n} rows of unfinished shards kept" in resumed.stdout + resumed.stderr
    assert not (out / kept.group(4)).exists()
    fresh = subprocess.run(_score_cmd(data, smollm2, tmp_path / "fresh"), capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a, b = (pl.read_parquet(p / "annotated.parquet").sort("srd_id") for p in (out, tmp_path / "fresh"))
    assert a["student_output"].to_list() == b["student_output"].to_list()
    assert a["ce_loss"].to_list() == pytest.approx(b["ce_loss"].to_list(), rel=1e-4)
    for row in partial.iter_rows(named=True):  # the kept rows are what the rerun used
        assert a.filter(pl.col("srd_id") == row["srd_id"])["student_output"].item() == row["student_output"]


def test_a_damaged_partial_file_is_named_and_not_used(tiny_llama, tmp_path):
    """A partial file whose bytes no longer match its record is not trusted: the shard is scored whole."""
    import srdata
    from srdata.run.folder import RunStore, read_manifest, write_manifest
    from srdata.run.partial import write_partial
    from srdata.run.folder import Shard

    write_jsonl(tmp_path / "d.jsonl", _rows(6))
    lines: list[str] = []
    srdata.score(_config(tiny_llama, tmp_path, max_new_tokens=4, shard_size=6), progress=False, echo=lines.append)
    full = pl.read_parquet(tmp_path / "r" / "shards" / "shard-00000.parquet")
    # Make it an interrupted run with 3 rows kept, then flip a bit of the partial file.
    manifest = read_manifest(tmp_path / "r")
    manifest.shards[0].done = False
    manifest.shards[0].partial = write_partial(RunStore(tmp_path / "r"), Shard(0, 0, 6), full.head(3))
    write_manifest(tmp_path / "r", manifest)
    (tmp_path / "r" / "shards" / "shard-00000.parquet").unlink()
    path = tmp_path / "r" / "shards" / "shard-00000.partial.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    lines.clear()
    srdata.score(_config(tiny_llama, tmp_path, max_new_tokens=4, shard_size=6), progress=False, echo=lines.append)
    assert any("shard-00000.partial.parquet" in line and "scoring shard 0 from its first row" in line for line in lines), lines
    assert not path.exists()
    again = pl.read_parquet(tmp_path / "r" / "shards" / "shard-00000.parquet")
    assert again["student_output"].to_list() == full["student_output"].to_list()


# ---------------------------------------------------------------------------- truncation
def test_truncation_is_said_before_and_after_the_run_with_the_setting_that_keeps_all(tiny_llama, tmp_path):
    import srdata

    rows = [{"instruction": ("Explain this carefully. " * (i + 1)).strip(), "output": "word " * (3 * i + 1)} for i in range(8)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    lines: list[str] = []
    result = srdata.score(_config(tiny_llama, tmp_path, max_new_tokens=2, max_prompt_tokens=120, max_reference_tokens=20,
                                  template="alpaca"), progress=False, echo=lines.append)
    counts = result.manifest["counts"]
    assert 0 < counts["prompts_truncated"] < 8 and 0 < counts["references_truncated"] < 8
    start = next(i for i, line in enumerate(lines) if line.startswith("loading the student"))
    before = [line for line in lines[:start] if "--max-prompt-tokens 120" in line]
    after = [line for line in lines[start:] if "--max-prompt-tokens 120" in line]
    assert before and after, lines
    said = re.search(r"(\d+) of 8 prompts \(\d+%\) are longer than --max-prompt-tokens 120 and were cut; --max-prompt-tokens (\d+) keeps", after[0])
    assert said and int(said.group(1)) == counts["prompts_truncated"]
    refs = next(line for line in lines[start:] if "--max-reference-tokens 20" in line)
    needed = re.search(r"(\d+) of 8 references .* --max-reference-tokens (\d+) keeps", refs)
    assert int(needed.group(1)) == counts["references_truncated"]
    # The value said keeps every text whole: a run with it cuts nothing.
    lines.clear()
    again = srdata.score(_config(tiny_llama, tmp_path, max_new_tokens=2, max_prompt_tokens=int(said.group(2)),
                                 max_reference_tokens=int(needed.group(2)), template="alpaca", output=str(tmp_path / "r2")),
                         progress=False, echo=lines.append)
    assert again.manifest["counts"]["prompts_truncated"] == 0 and again.manifest["counts"]["references_truncated"] == 0
    assert not [line for line in lines if "are cut" in line or "were cut" in line]


# ---------------------------------------------------------------------------- fast failures
def _fifo_dataset(tmp_path: Path) -> Path:
    """A dataset path whose reading blocks forever: any attempt to load it before the model check hangs the test."""
    path = tmp_path / "data.jsonl"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "model, env, message",
    [
        ("./no-such-student", {}, "model folder ./no-such-student does not exist"),
        ("someone/not-a-model", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ("someone/not-a-model", {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),
    ],
)
def test_model_errors_come_before_the_data_is_opened(tmp_path, model, env, message):
    data = _fifo_dataset(tmp_path)
    root = str(Path(__file__).resolve().parents[1])  # the srdata under test, from any working folder
    environ = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": root, **env}
    done = subprocess.run(
        [sys.executable, "-m", "srdata.cli", "score", str(data), "--model", model, "--output", str(tmp_path / "r"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=environ, cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert f"loading {data}" not in done.stdout


def test_offline_mode_for_a_cached_hub_model_ends_with_the_run(monkeypatch):
    # A library call must not leave the whole process offline (later loads and engines in it would change).
    import huggingface_hub.constants as constants

    from srdata.steps.hub import hub_offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with hub_offline(True):
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    with hub_offline(False):
        assert "HF_HUB_OFFLINE" not in os.environ
