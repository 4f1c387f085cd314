"""Ctrl-C during ``srdata score``: keep every finished row, and say exactly what was kept.

Finished shards are in the run folder already (each written when it finished). The rows
of the shard being scored that were finished when the interrupt came (whole batches, and
rows of the running batch that had produced their stop token) are written to the shard's
partial file (:mod:`srdata.run.partial`) with their checksum in the manifest; a rerun of
the same command scores only the other rows. The message counts what is on disk:

    interrupted: kept 37 of 100 rows in runs/a (0 of 1 shards complete; 37 rows of shard 0
    in shards/shard-00000.partial.parquet); run the same command again to resume

Example:
    >>> raise ScoreInterrupted(save_interrupted(kept, stop))      # doctest: +SKIP
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import polars as pl

from srdata.run.folder import Manifest, RunStore, Shard, read_manifest
from srdata.run.io import IntegrityError
from srdata.run.partial import drop_partial, partial_record, read_partial, write_partial


class ScoreInterrupted(KeyboardInterrupt):
    """``srdata score`` was interrupted; ``str(err)`` says what was kept and how to resume."""


class Kept:
    """What a run holds on disk while it runs (its manifest), to count and extend on Ctrl-C."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._manifest: Manifest | None = None
        self.rows_before = 0  # rows kept in the folder before this call

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    @manifest.setter
    def manifest(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self.rows_before = _rows_kept(manifest)

    def shard_done(self, entry: object) -> None:
        """A whole shard is written and recorded: its partial rows (if any) are not needed any more."""
        if partial_record(entry) is not None and self._manifest is not None:  # type: ignore[arg-type]
            drop_partial(self.store.dir, entry)  # type: ignore[arg-type]
            self.store.write_manifest(self._manifest)


def kept_partials(store: RunStore, manifest: Manifest, pending: list[Shard], say: Callable[[str], None]) -> dict[int, pl.DataFrame]:
    """The verified partial rows of the pending shards (a resumed run), recorded in ``manifest``.

    A partial file that does not match its record is named and not used (its shard is scored
    from the start, and the file is replaced when this run is interrupted again or removed
    when the shard is written).
    """
    kept: dict[int, pl.DataFrame] = {}
    for shard in pending:
        entry, earlier = manifest.shards[shard.index], store.records.get(shard.file)
        record = partial_record(earlier) if earlier is not None else None
        if record is None:
            continue
        entry.partial = record  # pydantic extra field: kept in manifest.json
        try:
            frame = read_partial(store.dir, entry)
        except IntegrityError as err:
            say(f"{err}: scoring shard {shard.index} from its first row")
            drop_partial(store.dir, entry)
            continue
        if frame is not None and frame.height:
            kept[shard.index] = frame
    return kept


def save_interrupted(kept: Kept, stop: BaseException) -> str:
    """Write the interrupted shard's finished rows (if any) and return the message saying what is kept."""
    store, manifest = kept.store, kept.manifest
    frame, shard = getattr(stop, "frame", None), getattr(stop, "shard", None)
    if manifest is not None:
        with _no_second_interrupt():  # a second Ctrl-C must not leave the record and the file apart
            entry = manifest.shards[shard.index] if shard is not None else None
            if entry is not None and frame is not None and frame.height and not entry.done:
                entry.partial = write_partial(store, shard, frame)
            store.write_manifest(manifest)  # as the run knows it (an interrupt may have come between two writes)
    if manifest is None:
        try:
            manifest = read_manifest(store.dir)
        except ValueError:
            manifest = None
        if manifest is None or not manifest.shards:
            return "interrupted before scoring started: this call scored no row; run the same command again to resume"
        kept.rows_before = _rows_kept(manifest)
    return _message(store, manifest, kept.rows_before)


def _rows_kept(manifest: Manifest) -> int:
    return sum(_entry_rows(entry) for entry in manifest.shards)


def _entry_rows(entry: object) -> int:
    if getattr(entry, "done", False) and getattr(entry, "sha256", None):  # recorded whole: a rerun keeps it
        return int(getattr(entry, "rows", None) or (entry.stop - entry.start))  # type: ignore[attr-defined]
    record = partial_record(entry)  # type: ignore[arg-type]
    return int(record.get("rows") or 0) if record else 0


def _message(store: RunStore, manifest: Manifest, rows_before: int) -> str:
    shards = manifest.shards
    total = shards[-1].stop if shards else 0
    rows = _rows_kept(manifest)
    done = sum(1 for s in shards if s.done)
    if shards and done == len(shards):
        return (f"interrupted after scoring: all {total} rows are scored and kept in {store.dir}; run the same command again "
                "to rank them and write annotated.parquet (no row is scored again)")
    if rows == 0:
        return f"interrupted: no row was finished, nothing is kept in {store.dir}; run the same command again to start"
    partial = [(s, partial_record(s)) for s in shards if not s.done and partial_record(s)]
    inside = "".join(f"; {r['rows']} rows of shard {s.index} in {r['file']}" for s, r in partial)
    this_call = rows - rows_before
    scored = f", {this_call} of them scored by this call" if rows_before else ""
    return (f"interrupted: kept {rows} of {total} rows in {store.dir}{scored} ({done} of {len(shards)} shards complete{inside}); "
            "run the same command again to resume")


@contextmanager
def _no_second_interrupt() -> Iterator[None]:
    """Ignore SIGINT for the moment a partial shard and its record are written (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
