"""Write curriculum stage files with public writers only: polars reads, pyarrow writes.

A stage file holds its rows part by part (see :func:`srdata.curriculum.cut.stage_parts`),
easiest part first, each part in the order of the rows it was read from, so the rows of
cumulative stage s-1 are the first rows of stage s. The rows are read once. A stage's
first part is handed to the writer thread of the largest stage that starts with it while
it is read (:class:`LiveRows`); every other part a stage holds is kept in a scratch file
(uncompressed Arrow IPC, beside the stage files, :class:`ScratchPart`), which that stage
reads once the reading is done. The stages are encoded on threads of their own (pyarrow
releases the GIL), alongside the reading. Stage files are ordinary parquet or JSON lines.

Example:
    >>> scratch = ScratchFiles(Path("out"))                                  # doctest: +SKIP
    >>> part = ScratchPart(scratch.new("part-1.arrows"), schema)             # doctest: +SKIP
    >>> split_into_parts(rows, stage_parts([(0, 10), (0, 20)])[0], "difficulty_rank", [[live_rows], [part]])   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import queue
import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from srdata.curriculum.cut import CurriculumError, StagePart
from srdata.run.io import WriteError, temp_path, write_problem

STAGE_COLUMN = "stage"
ZSTD_LEVEL = 1
DICTIONARY_PAGE_BYTES = 64 << 10
QUEUED_BATCHES = 2  # per stage writer: enough to keep it busy, few enough to bound memory
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how polars (Rust) reports an IO error


def as_write_error(err: BaseException, path: str | os.PathLike[str]) -> WriteError | None:
    """The :class:`WriteError` naming ``path`` for an IO failure while writing it; ``None`` for other errors.

    pyarrow raises an ``OSError``; polars a ``ComputeError`` (or an ``OSError`` without errno)
    whose message ends in ``(os error 28)``: both become "no space left on the device; ...".

    Example:
        >>> str(as_write_error(OSError("No space left on device (os error 28)"), "out/a.jsonl"))
        'could not write out/a.jsonl: no space left on the device; free some space or choose a folder on another disk'
    """
    if isinstance(err, WriteError):
        return err
    code = getattr(err, "errno", None)
    found = _OS_ERROR.search(str(err)) if code is None else None
    if found:
        code = int(found[1])
        err = OSError(code, os.strerror(code))
    if isinstance(err, OSError):
        return WriteError(write_problem(err, path))
    return None


class ScratchFiles:
    """Temporary files in the output folder, all removed at the end, whatever happens."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []

    def new(self, name: str) -> Path:
        path = temp_path(self.folder / name)
        self.paths.append(path)
        return path

    def remove_all(self, keep: set[Path] | frozenset[Path] = frozenset()) -> None:
        for path in self.paths:
            if path not in keep:
                path.unlink(missing_ok=True)


def prepare_output(out_dir: Path, what: str = "output folder") -> Path:
    """Create the output folder and prove it is writable before any work is done.

    Example:
        >>> prepare_output(Path("runs/dolly/curriculum"))        # doctest: +SKIP
        PosixPath('runs/dolly/curriculum')
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_path(out_dir / "write-test")  # marked: removed by a later run if this one is killed here
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CurriculumError(f"{what} {out_dir} is not writable: {err.strerror or err}") from None
    return out_dir


def stage_file_paths(out_dir: Path, n_stages: int, fmt: str) -> list[Path]:
    """Where each stage goes: ``stage-0.parquet``, ``stage-1.parquet``, ...

    Example:
        >>> [p.name for p in stage_file_paths(Path("out"), 2, "jsonl")]
        ['stage-0.jsonl', 'stage-1.jsonl']
    """
    return [out_dir / f"stage-{s}.{fmt}" for s in range(n_stages)]


def part_schema(rows: pl.LazyFrame) -> pa.Schema:
    """The Arrow schema the rows of a part are handed on with (polars' plain conversion: ``large_string`` texts).

    Example:
        >>> part_schema(pl.LazyFrame({"text": ["a"]})).field("text").type
        DataType(large_string)
    """
    return pl.DataFrame(schema=rows.collect_schema()).to_arrow().schema


def stage_schema(rows: pl.LazyFrame) -> pa.Schema:
    """The Arrow schema of a parquet stage file: the rows' columns, then ``stage`` (Int64).

    Example:
        >>> stage_schema(pl.LazyFrame({"srd_id": [1]})).names
        ['srd_id', 'stage']
    """
    empty = pl.DataFrame(schema=rows.collect_schema()).with_columns(pl.lit(0, dtype=pl.Int64).alias(STAGE_COLUMN))
    return empty.to_arrow().schema


class PartSink(Protocol):
    """Where the rows of one part go while they are read."""

    def put(self, rows: pa.Table) -> None: ...

    def close(self, aborted: bool = False) -> None: ...


class ScratchPart:
    """A part's rows in an uncompressed Arrow IPC stream file, for the stages that hold it after another part.

    The stream format, not the file format: it takes a new dictionary in every batch (categoricals).
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.writer = pa.ipc.new_stream(str(path), schema)

    def put(self, rows: pa.Table) -> None:
        self.writer.write_table(rows)

    def close(self, aborted: bool = False) -> None:
        self.writer.close()


_END, _ABORT = object(), object()


class LiveRows:
    """Rows handed from the reading thread to one stage writer thread, through a bounded queue.

    A writer that fails drains the queue (:meth:`drain`), so the reading thread never blocks
    on it; the reading thread reads on and the writer's error is raised when it is collected.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUED_BATCHES)
        self.ended = False
        self.failed = False

    def put(self, rows: pa.Table) -> None:
        if not self.failed:
            self.queue.put(rows)

    def close(self, aborted: bool = False) -> None:
        self.queue.put(_ABORT if aborted else _END)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while (item := self.queue.get()) is not _END:
            if item is _ABORT:
                self.ended = True
                raise RuntimeError("reading the rows failed; the stage file is discarded")
            assert isinstance(item, pa.Table)
            yield from item.to_batches()
        self.ended = True

    def drain(self) -> None:
        self.failed = True
        while not self.ended:
            self.ended = self.queue.get() in (_END, _ABORT)


def part_sinks(
    members: Sequence[Sequence[int]], n_parts: int, scratch: ScratchFiles, schema: pa.Schema
) -> tuple[list[LiveRows | None], dict[int, ScratchPart], list[list[LiveRows | ScratchPart]]]:
    """Where each part's rows go while they are read: live streams, scratch files, and the sinks of every part.

    ``members[s]`` lists the parts of stage s, easiest first. Of the stages that start with
    the same part, the one holding the most parts streams it live to its writer while it is
    read (``live[s]``; ``None`` for the others): that stage's file is the longest chain of
    encoding, so it starts at once, while the reading and the other stages share the other
    cores. Every other part a stage holds waits in a scratch file, read once the rows are.

    Example:
        >>> live, stored, sinks = part_sinks([[0], [0, 1]], 2, ScratchFiles(Path("out")), schema)   # doctest: +SKIP
        >>> [stream is not None for stream in live], sorted(stored), [len(s) for s in sinks]       # doctest: +SKIP
        ([False, True], [0, 1], [2, 1])
    """
    live: list[LiveRows | None] = [None] * len(members)
    for g in range(n_parts):
        starting = [s for s, held in enumerate(members) if held[:1] == [g]]
        if starting:
            live[max(reversed(starting), key=lambda s: len(members[s]))] = LiveRows()
    for s, held in enumerate(members):
        if not held:
            live[s] = LiveRows()
            live[s].close()  # an empty stage: no part will end its stream
    stored_parts = sorted({g for s, held in enumerate(members) for g in (held[1:] if live[s] is not None else held)})
    stored = {g: ScratchPart(scratch.new(f"part-{g}.arrows"), schema) for g in stored_parts}
    sinks: list[list[LiveRows | ScratchPart]] = [
        [*(live[s] for s, held in enumerate(members) if held[:1] == [g] and live[s] is not None), *([stored[g]] if g in stored else [])]
        for g in range(n_parts)
    ]
    return live, stored, sinks


def split_into_parts(rows: pl.LazyFrame, parts: Sequence[StagePart], position_column: str, sinks: Sequence[Sequence[PartSink]]) -> None:
    """Read the rows once and hand each to every sink of its part (``sinks[g]`` for part g); close the sinks.

    A row's part is found from ``position_column`` (1-based easy-to-hard position: the row
    at position p has value p + 1); rows in no part (invalid, dropped) go nowhere.
    """
    aborted = True
    try:  # from the first line: a writer waits on its sink until it is closed
        schema = part_schema(rows)
        part_of_row = _part_expression(parts, position_column)
        for batch in rows.collect_batches(maintain_order=True) if any(sinks) else ():
            split = batch.with_columns(part_of_row).partition_by("__part", maintain_order=True, include_key=False, as_dict=True)
            for (g,), part_rows in split.items():
                if g >= 0 and sinks[g]:
                    table = part_rows.to_arrow()
                    table = table if table.schema == schema else table.cast(schema)
                    for sink in sinks[g]:
                        sink.put(table)
        aborted = False
    finally:
        for sink in (sink for part_sinks in sinks for sink in part_sinks):
            sink.close(aborted)


def _part_expression(parts: Sequence[StagePart], position_column: str) -> pl.Expr:
    position = pl.col(position_column)
    part = pl.lit(-1, dtype=pl.Int32)  # a null position (invalid row) matches no part
    for g, piece in reversed(list(enumerate(parts))):
        part = pl.when((position > piece.start) & (position <= piece.stop)).then(pl.lit(g, dtype=pl.Int32)).otherwise(part)
    return part.alias("__part")


def part_batches(part_files: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    """The record batches of scratch files, in order (read, not memory-mapped: memory stays bounded).

    Example:
        >>> sum(batch.num_rows for batch in part_batches([Path("out/.tmp-1-part-1.arrows")]))   # doctest: +SKIP
        250000
    """
    for path in part_files:
        with pa.OSFile(str(path)) as source:
            yield from pa.ipc.open_stream(source)


def write_parquet_stage(
    path: Path, stage: int, batches: Iterable[pa.RecordBatch], schema: pa.Schema, compression: str, level: int | None, row_group_bytes: int
) -> Path:
    """Write one parquet stage file from its rows' batches, in row groups of about ``row_group_bytes``."""
    with parquet_writer(path, schema, compression, level) as writer:
        pending: list[pa.RecordBatch] = []
        pending_bytes = 0
        for batch in batches:
            pending.append(batch.append_column(STAGE_COLUMN, _constant(stage, batch.num_rows)))
            pending_bytes += batch.nbytes
            if pending_bytes >= row_group_bytes:
                _write_row_group(writer, pending, schema)
                pending, pending_bytes = [], 0
        if pending:
            _write_row_group(writer, pending, schema)
    return path


def _write_row_group(writer: pq.ParquetWriter, batches: list[pa.RecordBatch], schema: pa.Schema) -> None:
    table = pa.Table.from_batches(batches)
    table = table if table.schema == schema else table.cast(schema)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))


def _constant(value: int, rows: int) -> pa.Array:
    # From a buffer: pa.array would import pandas (0.4-0.8 s) on first use.
    return pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(np.full(rows, value, dtype=np.int64))])


def write_jsonl_stage(path: Path, stage: int, batches: Iterable[pa.RecordBatch]) -> Path:
    """Write one JSON-lines stage file from its rows' batches, ``stage`` the last key of every line."""
    with open(path, "wb") as handle:
        for batch in batches:
            rows = pl.from_arrow(batch)
            assert isinstance(rows, pl.DataFrame)
            rows.with_columns(pl.lit(stage, dtype=pl.Int64).alias(STAGE_COLUMN)).write_ndjson(handle)
    return path


def compression_level(compression: str) -> int | None:
    """The codec level of the stage files: zstd level 1 costs about 30% less CPU than level 3, for 10% larger files.

    Example:
        >>> compression_level("zstd"), compression_level("lz4")
        (1, None)
    """
    return ZSTD_LEVEL if compression == "zstd" else None


def parquet_writer(path: Path | str | pa.NativeFile, schema: pa.Schema, compression: str, level: int | None) -> pq.ParquetWriter:
    """The pyarrow writer every parquet stage file is written with.

    Example:
        >>> with parquet_writer("out.parquet", table.schema, "zstd", 1) as writer:   # doctest: +SKIP
        ...     writer.write_table(table)
    """
    codec = "none" if compression == "uncompressed" else compression
    delta = [f.name for f in schema if pa.types.is_integer(f.type)]
    return pq.ParquetWriter(
        path,
        schema,
        compression=codec,
        compression_level=level,
        # Integer columns (srd_id, the ranks, stage) as DELTA_BINARY_PACKED: a rank is a
        # shuffled 1..N, which zstd barely shrinks from 8 bytes; bit-packed deltas take
        # ~3, smaller than plain + zstd, for a third of its CPU time. Every parquet
        # reader in use (pyarrow, polars, duckdb, Spark 3.3+) decodes them.
        use_dictionary=[c for c in leaf_columns(schema) if c not in delta] if delta else True,
        column_encoding=dict.fromkeys(delta, "DELTA_BINARY_PACKED") or None,
        # Dictionaries only for columns with few distinct values: hashing a long text or a
        # float column until its dictionary overflows is CPU spent for nothing.
        dictionary_pagesize_limit=DICTIONARY_PAGE_BYTES,
    )


@functools.lru_cache(maxsize=16)
def leaf_columns(schema: pa.Schema) -> tuple[str, ...]:
    """Parquet's leaf column paths of ``schema`` (``meta.x``, ``tokens.list.element``).

    Example:
        >>> leaf_columns(pa.schema([("a", pa.int64())]))
        ('a',)
    """
    sink = pa.BufferOutputStream()
    # from_batches, not schema.empty_table(): that builds arrays with pa.array, which imports pandas.
    pq.write_table(pa.Table.from_batches([], schema=schema), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return tuple(parquet_schema.column(i).path for i in range(len(parquet_schema)))
