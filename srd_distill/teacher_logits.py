"""The teacher's cached top-K (``srdata teach RUN --teacher T --top-k K``), read once and checked row by row.

``srd-distill train --teacher-logits RUN`` trains from ``RUN/teacher/`` instead of a teacher
model. :func:`open_teacher_logits` reads it, refusing before any work:

* a folder that is no scored run, or a run without cached logits (no ``RUN/teacher``, or a
  teach pass with ``--top-k 0``), an unfinished teach pass, or another K than asked;
* a teach pass of an earlier scoring of the run (its ``settings.run.config_hash`` is not
  the run's ``manifest.json`` ``config_hash``);
* a shard that does not match its checksum, lacks one, or does not hold exactly its rows;
* a student whose tokenizer has another size than the one the run was scored with.

Only the rows the run trains on are kept, as two flat arrays (ids int32, log-probs float16,
as stored: ``K x 6`` bytes per reference token) with each row's first position.
:meth:`TeacherLogits.align` then proves, row by row, that srd-distill's own encoding of a
training row is what the teacher scored (the SHA-256 of its prompt and reference ids,
:func:`srdata.steps.teacher.token_ids_digest`) and refuses a row without a cached row, an
empty one or one of another size, naming the row, the file and the fix.
:meth:`TeacherLogits.lookup` gives a batch's ``(tokens, K)`` ids and log-probs in the order
of its scored positions, by vectorised indexing (no file is read during training).

Encoding: srd-distill encodes a row exactly as ``srdata score`` did (same template, prompt
truncation, reference cap and end-of-sequence), then cuts prompt + reference to
``--max-length``. The cut keeps a prefix, and the teacher's distribution at position k
depends only on the tokens before it, so the cached positions of the kept prefix are exact;
the digest is taken over the whole pair, before the cut.

Example:
    >>> logits = open_teacher_logits("runs/dolly", top_k=64, srd_ids=[0, 1, 2])   # doctest: +SKIP
    >>> data = logits.align(encoded, Path("runs/dolly/curriculum/stage-0.parquet"))   # doctest: +SKIP
    >>> ids, logprobs = logits.lookup(data.examples[:4], torch.device("cpu"))          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import polars as pl
import torch

from srd_distill.data import EncodedData, EncodingSettings, Example, encode_file, read_pairs
from srd_distill.errors import TrainingSetupError
from srdata.run.folder import MANIFEST_FILE, Manifest, RunDirError, ShardRecord, read_manifest
from srdata.run.io import IntegrityError, read_shard_rows, verify_file
from srdata.steps.teacher import TEACHER_FOLDER

__all__ = ["TEACHER_FOLDER", "TeacherLogits", "open_teacher_logits", "cached_teacher_for", "teach_command"]

COLUMNS = ["srd_id", "prompt_tokens", "reference_tokens", "token_ids_sha256", "top_ids", "top_logprobs"]


def teach_command(run: Path | str, top_k: Optional[int], teacher: str = "TEACHER", overwrite: bool = False) -> str:
    """The command that writes the cache srd-distill needs.

    Example:
        >>> teach_command("runs/a", 64)
        '`srdata teach runs/a --teacher TEACHER --top-k 64`'
    """
    return f"`srdata teach {run} --teacher {teacher} --top-k {top_k or 'K'}{' --overwrite' * overwrite}`"


@dataclass
class TeacherLogits:
    """The cached top-K of the rows a run trains on (see the module docstring)."""

    run: Path
    top_k: int
    teacher: str  # the teacher's name, for messages
    fingerprint: dict[str, Any]  # what run.json records under inputs["teacher_logits"]
    srd_ids: np.ndarray  # (rows,) sorted
    digests: np.ndarray  # (rows,) token_ids_sha256, None for an empty row
    prompt_tokens: np.ndarray  # (rows,) -1 for an empty row
    reference_tokens: np.ndarray
    first: np.ndarray  # (rows,) the row's first position in ids/logprobs
    ids: np.ndarray  # (positions, K) int32
    logprobs: np.ndarray  # (positions, K) float16, natural log-probs at T = 1

    def fix(self, overwrite: bool = True) -> str:
        return teach_command(self.run, self.top_k, self.teacher, overwrite)

    def align(self, data: EncodedData, file: Path) -> EncodedData:
        """``data`` with each example pointing at its cached positions; refuses any row that does not match, named.

        Example:
            >>> logits.align(encode_file(path, tok, encoding, 512, srd_ids=True)[0], path)   # doctest: +SKIP
        """
        wanted = np.asarray(data.srd_ids, dtype=np.int64)
        at = np.searchsorted(self.srd_ids, wanted).clip(max=max(len(self.srd_ids) - 1, 0))
        found = (self.srd_ids[at] == wanted) if len(self.srd_ids) else np.zeros(len(wanted), bool)
        if not found.all():
            missing = wanted[~found]
            raise TrainingSetupError(
                f"{file}: {len(missing)} row(s) have no row in the teacher's cache {self.run / TEACHER_FOLDER} (srd_id "
                f"{_some(missing)}): the data does not come from {self.run}. Train on {self.run}'s annotated.parquet or its "
                f"export, or run {teach_command('RUN', self.top_k)} on the run the data comes from")
        empty = self.prompt_tokens[at] < 0
        if empty.any():
            raise TrainingSetupError(
                f"{file}: the teacher's cache in {self.run / TEACHER_FOLDER} holds no top-K for srd_id {_some(wanted[empty])} "
                f"(rows the teach pass found invalid); the data and the run disagree on which rows are valid: train on "
                f"{self.run}'s own export, or redo the teach pass: {self.fix()}")
        ours = np.asarray(data.digests, dtype=object)
        differ = np.flatnonzero(ours != self.digests[at])
        if differ.size:
            i = int(differ[0])
            raise TrainingSetupError(
                f"{file}: row srd_id={int(wanted[i])} is encoded by srd-distill as {len(data.prompt_ids[i])} + "
                f"{data.reference_lengths[i]} tokens, but the teacher scored {int(self.prompt_tokens[at[i]])} + "
                f"{int(self.reference_tokens[at[i]])} other ids ({differ.size} of {len(wanted)} rows differ): the cached top-K "
                f"would belong to other tokens. The student's tokenizer, the data or the run's prompt settings are not the ones "
                f"{self.run} was scored and taught with: give the student that was scored (or one with its tokenizer) and "
                f"train on the run's own export, or redo the teach pass: {self.fix()}")
        examples = [dataclasses.replace(e, cache_start=int(self.first[j]) + (e.prompt_length == 0))
                    for e, j in zip(data.examples, at.tolist())]  # no prompt: the first reference token is not scored
        return dataclasses.replace(data, examples=examples)

    def lookup(self, examples: Sequence[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, logprobs)``, each ``(scored tokens, K)``, of these examples' scored positions, row by row.

        Example:
            >>> ids, logprobs = logits.lookup(batch_examples, torch.device("cuda"))   # doctest: +SKIP
        """
        starts = np.fromiter((e.cache_start for e in examples), dtype=np.int64, count=len(examples))
        counts = np.fromiter((e.scored_tokens for e in examples), dtype=np.int64, count=len(examples))
        if (starts < 0).any():
            raise RuntimeError("examples must be aligned with TeacherLogits.align before their top-K is looked up")
        before = np.cumsum(counts) - counts
        rows = np.repeat(starts - before, counts) + np.arange(int(counts.sum()))
        ids = torch.from_numpy(self.ids[rows]).to(device).long()
        logprobs = torch.from_numpy(self.logprobs[rows]).to(device).float()
        return ids, logprobs


def open_teacher_logits(run: str | Path, top_k: Optional[int], srd_ids: Sequence[int] | np.ndarray,
                        vocab_size: Optional[int] = None) -> TeacherLogits:
    """Read ``RUN/teacher`` for the rows ``srd_ids``, after every check of the module docstring.

    ``top_k``: the K asked for (None: the cache's); ``vocab_size``: the student tokenizer's size,
    checked against the run's.

    Example:
        >>> open_teacher_logits("runs/dolly", 64, [0, 1]).ids.shape   # doctest: +SKIP
        (57, 64)
    """
    run = Path(run)
    run_manifest = _manifest(run, f"{run} holds no scored run (no {MANIFEST_FILE}): --teacher-logits takes the folder of "
                                  f"`srdata score`, after {teach_command(run, top_k)}")
    folder = run / TEACHER_FOLDER
    if not (folder / MANIFEST_FILE).is_file():
        raise TrainingSetupError(f"{run} holds no cached teacher logits ({folder / MANIFEST_FILE} is missing): run "
                                 f"{teach_command(run, top_k)} first")
    manifest = _manifest(folder, "")
    teacher = str((manifest.identity.get("teacher") or {}).get("name") or "TEACHER")
    cached = int((manifest.settings.get("teach") or {}).get("top_k") or 0)
    if cached == 0:
        raise TrainingSetupError(f"the teach pass in {folder} stored no top-K log-probs (it ran with --top-k 0): run "
                                 f"{teach_command(run, top_k, teacher, overwrite=True)}")
    if top_k is not None and cached != top_k:
        raise TrainingSetupError(f"{folder} caches the teacher's top-{cached}, not the top-{top_k} asked: pass "
                                 f"--teacher-top-k {cached}, or redo the teach pass: {teach_command(run, top_k, teacher, True)}")
    if manifest.status != "complete" or not all(s.done for s in manifest.shards):
        raise TrainingSetupError(f"the teach pass in {folder} is not finished: run {teach_command(run, cached, teacher)} again "
                                 "to finish it")
    scored_with = (manifest.settings.get("run") or {}).get("config_hash")
    if scored_with != run_manifest.config_hash:
        raise TrainingSetupError(
            f"the teach pass in {folder} was made for another scoring of {run} (run config_hash {scored_with}, the run's "
            f"manifest.json has {run_manifest.config_hash}): the run was scored again since; redo the teach pass: "
            f"{teach_command(run, cached, teacher, True)}")
    recorded = (run_manifest.tokenizer or {}).get("vocab_size")
    if vocab_size is not None and recorded is not None and int(recorded) != vocab_size:
        raise TrainingSetupError(f"the student's tokenizer has {vocab_size} tokens but {run} was scored and taught with one of "
                                 f"{recorded}: the cached ids would mean other tokens; give a student with the run's tokenizer")
    frame = _read_rows(folder, manifest.shards, np.unique(np.asarray(srd_ids, dtype=np.int64)), cached, teacher)
    return _arrays(run, cached, teacher, _fingerprint(folder, manifest, cached), frame)


def cached_teacher_for(files: Sequence[Path], run: str | Path, top_k: Optional[int], tokenizer: Any, encoding: EncodingSettings,
                       max_length: int, vocab_size: int) -> TeacherLogits:
    """The cache of a run's training ``files`` (stage files or the ``--data`` file), every row of every file aligned.

    Everything is checked before any training: a mismatch in the last stage is not found hours later.

    Example:
        >>> cached = cached_teacher_for(stage_files, "runs/dolly", 64, tokenizer, encoding, 512, 49152)   # doctest: +SKIP
    """
    ids = np.unique(np.concatenate([read_pairs(f, srd_ids=True)[0]["srd_id"].to_numpy() for f in files]))
    cached = open_teacher_logits(run, top_k, ids, vocab_size)
    for file in files:
        cached.align(encode_file(file, tokenizer, encoding, max_length, srd_ids=True)[0], Path(file))
    return cached


def _manifest(folder: Path, missing: str) -> Manifest:
    try:
        manifest = read_manifest(folder)
    except RunDirError as err:
        raise TrainingSetupError(str(err)) from None
    if manifest is None:
        raise TrainingSetupError(missing)
    return manifest


def _read_rows(folder: Path, shards: list[ShardRecord], wanted: np.ndarray, top_k: int, teacher: str) -> pl.DataFrame:
    """The wanted rows of every shard, each shard verified first (checksum, size, exactly its srd_ids)."""
    fix = f"redo the teach pass: {teach_command(folder.parent, top_k, teacher, True)}"
    frames = []
    for record in shards:
        lo, hi = np.searchsorted(wanted, [record.start, record.stop])
        if lo == hi:
            continue  # no training row in this shard: not read at all
        path = folder / record.file
        if record.sha256 is None:
            raise TrainingSetupError(f"{path} has no checksum in {folder / MANIFEST_FILE}; {fix}")
        try:
            verify_file(path, record.sha256, record.bytes, fix=fix)
            frame = read_shard_rows(path, record.start, record.stop, COLUMNS, fix=fix)
        except IntegrityError as err:
            raise TrainingSetupError(str(err)) from None
        frame = frame.filter(pl.Series(np.isin(frame["srd_id"].to_numpy(), wanted[lo:hi])))
        expected = pl.col("reference_tokens") * top_k
        wrong = frame.filter(pl.col("token_ids_sha256").is_not_null() & (
            (pl.col("top_ids").list.len() != expected) | (pl.col("top_logprobs").list.len() != expected)))
        if wrong.height:
            row = wrong.row(0, named=True)
            raise TrainingSetupError(
                f"{path}: row srd_id={row['srd_id']} holds {len(row['top_ids'])} ids for {row['reference_tokens']} reference "
                f"tokens, not {row['reference_tokens']} x K={top_k} ({wrong.height} rows): the cache is not one top-{top_k} pass; {fix}")
        frames.append(frame)
    return pl.concat(frames) if frames else pl.DataFrame(schema={c: pl.Int64 for c in COLUMNS[:3]})


def _flat(series: pl.Series, dtype: Any) -> np.ndarray:
    """A list column's values, concatenated (the frame's rows in order), as a numpy array of ``dtype``."""
    import pyarrow as pa

    array = series.to_arrow()
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=dtype)


def _arrays(run: Path, top_k: int, teacher: str, fingerprint: dict[str, Any], frame: pl.DataFrame) -> TeacherLogits:
    """The rows as arrays; empty rows (nulls) keep their id, with no positions."""
    if frame.height == 0:
        none = np.zeros(0, dtype=np.int64)
        return TeacherLogits(run, top_k, teacher, fingerprint, none, np.zeros(0, object), none, none, none,
                             np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float16))
    valid = frame.filter(pl.col("token_ids_sha256").is_not_null())
    ids = _flat(valid["top_ids"], np.int32).reshape(-1, top_k)
    logprobs = _flat(valid["top_logprobs"], np.float16).reshape(-1, top_k)
    if ids.size and (ids.min() < 0 or np.isnan(logprobs).any() or np.isposinf(logprobs).any()):
        raise TrainingSetupError(f"{run / TEACHER_FOLDER} holds negative token ids or NaN or +inf log-probs: it was not written by "
                                 f"`srdata teach`; redo the teach pass: {teach_command(run, top_k, teacher, True)}")
    reference = frame["reference_tokens"].fill_null(0).to_numpy().astype(np.int64)
    first = np.cumsum(reference) - reference
    return TeacherLogits(
        run=run, top_k=top_k, teacher=teacher, fingerprint=fingerprint, srd_ids=frame["srd_id"].to_numpy().astype(np.int64),
        digests=np.asarray(frame["token_ids_sha256"].to_list(), dtype=object),
        prompt_tokens=frame["prompt_tokens"].fill_null(-1).to_numpy().astype(np.int64), reference_tokens=reference,
        first=first, ids=ids, logprobs=logprobs)


def _fingerprint(folder: Path, manifest: Manifest, top_k: int) -> dict[str, Any]:
    """The cache by content: the teacher's identity, K, the run it was made for, and every shard's checksum."""
    shards = hashlib.sha256("".join(f"{s.file} {s.sha256}\n" for s in manifest.shards).encode()).hexdigest()
    return {"folder": str(folder.resolve()), "top_k": top_k, "teacher": manifest.identity.get("teacher"),
            "run_config_hash": (manifest.settings.get("run") or {}).get("config_hash"), "shards_sha256": shards}


def _some(values: np.ndarray, shown: int = 5) -> str:
    listed = ", ".join(str(int(v)) for v in values[:shown])
    return listed + (f" and {len(values) - shown} more" if len(values) > shown else "")
