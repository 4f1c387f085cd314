"""Training data of ``srd-distill``: files -> prompt/reference strings -> token ids -> padded batches.

* :func:`read_pairs` reads a ``.parquet``/``.jsonl``/``.json`` file with ``prompt_text``/
  ``reference_text`` columns (or ``prompt``/``response``, ``prompt``/``completion``),
  leaving out rows srdata flagged as invalid.
* :func:`find_encoding_settings` finds the prompt settings of the ``srdata score`` run
  the data came from, so :func:`encode_data` tokenizes exactly as scoring did.
* :func:`collate` right-pads examples into tensors; :func:`split_rows` cuts one step's
  rows into micro-batches.
* :func:`checked_curriculum` lists a curriculum's stage files and their checksums, each
  checked against ``curriculum.json``.

Example:
    >>> split_rows([1, 2, 3, 4, 5], 2)
    [[1, 2, 3], [4, 5]]
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import polars as pl
import torch

from srd_distill.errors import CurriculumFilesError, TrainingSetupError
from srdata.run.folder import CURRICULUM_FILE, MANIFEST_FILE, RunDirError, read_manifest
from srdata.run.io import file_sha256
from srdata.run.storage import is_remote, shown

__all__ = [
    "TEXT_COLUMN_PAIRS",
    "read_pairs",
    "EncodingSettings",
    "find_encoding_settings",
    "Example",
    "EncodedData",
    "encode_data",
    "encode_file",
    "Batch",
    "collate",
    "split_rows",
    "curriculum_stage_files",
    "checked_curriculum",
]

log = logging.getLogger(__name__)

TEXT_COLUMN_PAIRS = (("prompt_text", "reference_text"), ("prompt", "response"), ("prompt", "completion"))


def read_pairs(path: str | os.PathLike[str], *, srd_ids: bool = False) -> tuple[pl.DataFrame, int]:
    """Read ``prompt_text``/``reference_text`` pairs from a parquet/jsonl/json file.

    Columns ``prompt``/``response`` or ``prompt``/``completion`` are accepted too. Rows
    that srdata flagged as invalid (``invalid_reason`` set) are left out; their count is
    returned alongside the pairs. Any other missing prompt or reference is an error.
    With ``srd_ids``, the rows' ``srd_id`` column is kept too (``--teacher-logits`` looks the
    cached teacher up by it); a file without one is refused.

    Example:
        >>> pairs, flagged = read_pairs("runs/dolly/annotated.parquet")   # doctest: +SKIP
        >>> pairs.columns                                                  # doctest: +SKIP
        ['prompt_text', 'reference_text']
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingSetupError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pl.read_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        frame = pl.read_ndjson(path)
    elif suffix == ".json":
        frame = read_json_rows(path)
    else:
        raise TrainingSetupError(f"data file {path} must be .parquet, .jsonl or .json")
    columns = next(((p, r) for p, r in TEXT_COLUMN_PAIRS if p in frame.columns and r in frame.columns), None)
    if columns is None:
        wanted = ", ".join(f"{p}/{r}" for p, r in TEXT_COLUMN_PAIRS)
        raise TrainingSetupError(
            f"data file {path} has no prompt/reference columns (looked for {wanted}); it has: "
            f"{', '.join(frame.columns) or 'no columns'}. Score raw data with `srdata score` to get prompt_text/reference_text"
        )
    flagged = 0
    if "invalid_reason" in frame.columns:
        valid = frame["invalid_reason"].is_null()
        flagged = int((~valid).sum())
        frame = frame.filter(valid)
    if srd_ids and "srd_id" not in frame.columns:
        raise TrainingSetupError(
            f"data file {path} has no srd_id column: --teacher-logits looks each row's cached teacher up by its srd_id; "
            "train on the run's annotated.parquet or a stage file of its export (`srdata export RUN`)"
        )
    pairs = frame.select(pl.col(columns[0]).alias("prompt_text"), pl.col(columns[1]).alias("reference_text"),
                         *([pl.col("srd_id").cast(pl.Int64)] if srd_ids else []))
    missing = pairs.with_row_index("row").filter(pl.col("prompt_text").is_null() | pl.col("reference_text").is_null()
                                                 | (pl.col("srd_id").is_null() if srd_ids else pl.lit(False)))
    if missing.height:
        rows = ", ".join(str(r) for r in missing["row"].head(10).to_list())
        what = "prompt, reference or srd_id" if srd_ids else "prompt or reference"
        raise TrainingSetupError(f"data file {path}: {missing.height} row(s) have no {what} (rows {rows}); fix or drop them")
    if pairs.height == 0:
        raise TrainingSetupError(f"data file {path} holds no usable rows")
    return pairs, flagged


def read_json_rows(path: Path) -> pl.DataFrame:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        return pl.read_ndjson(path)  # a .json file that is really JSON lines
    if not isinstance(rows, list):
        raise TrainingSetupError(f"{path} must hold a JSON list of objects (or JSON lines)")
    return pl.DataFrame(rows)


@dataclass(frozen=True)
class EncodingSettings:
    """The prompt/reference encoding of the source run (see :func:`srdata.encode_pairs`).

    The prompts are encoded by srdata's one rule for the run's template
    (:func:`srdata.steps.tokenize.prompt_encoding`), so training sees the ids that were scored.
    """

    max_prompt_tokens: int
    max_reference_tokens: Optional[int]
    truncation_side: str
    add_special_tokens: bool  # prompt_encoding(template)'s: False for chat-template prompts, which carry their own
    rouge_tokenizer: str
    source: str  # the manifest it came from, or "srdata defaults"
    template: Optional[str] = None  # the template the source run rendered its prompts with (None: not known)

    def describe(self) -> dict[str, Any]:
        """What ``run.json`` records (the template is left out: it decides ``add_special_tokens``, recorded as before)."""
        return {k: v for k, v in self.__dict__.items() if k != "template"}

    def prompt_options(self, tokenizer: Any) -> dict[str, Any]:
        """The :func:`srdata.steps.tokenize.encode_pairs` options for the prompts: srdata's rule for the run's template.

        Settings made without a template (by hand) name the chat case by ``add_special_tokens=False``.
        """
        from srdata.steps.tokenize import prompt_encoding

        template = self.template if self.template is not None else (None if self.add_special_tokens else "chat")
        return prompt_encoding(template, tokenizer, max_prompt_tokens=self.max_prompt_tokens,
                               truncation_side=self.truncation_side)  # type: ignore[arg-type]


def find_encoding_settings(data_path: str | os.PathLike[str], echo: Callable[[str], None] = log.info) -> EncodingSettings:
    """The encoding the source ``srdata score`` run used, read from its ``manifest.json``.

    ``data_path`` is a curriculum folder (its ``curriculum.json`` names the source run;
    ``srdata export``'s default output sits inside the run folder, which is tried next) or
    a data file (an ``annotated.parquet`` has the manifest beside it). Without a manifest,
    srdata's defaults are used, and the fact is reported.

    Example:
        >>> find_encoding_settings("runs/dolly/curriculum").truncation_side   # doctest: +SKIP
        'left'
    """
    from srdata.config import MetricsConfig, PromptConfig
    from srdata.steps.tokenize import prompt_encoding

    path = Path(data_path)
    run_dirs: list[Path] = []
    if path.is_dir():
        summary_file = path / CURRICULUM_FILE
        if summary_file.is_file():
            run_dir = (json.loads(summary_file.read_text(encoding="utf-8")).get("source") or {}).get("run_dir")
            if run_dir and is_remote(run_dir):  # a run in object storage: a copy of its manifest
                from srdata.curriculum.remote_read import run_manifest_copy

                run_dirs.append(run_manifest_copy(run_dir))
            elif run_dir:
                run_dirs.append(Path(run_dir))
    run_dirs.append(path.parent)
    for run_dir in run_dirs:
        try:
            manifest = read_manifest(run_dir)
        except RunDirError as err:  # encoding with srdata's defaults instead could silently differ from the run's
            raise TrainingSetupError(f"cannot read the encoding settings of the source run: {err}") from None
        if manifest is None or "prompt" not in manifest.config.model_fields_set:
            continue  # not a manifest of `srdata score`
        prompt, metrics = manifest.config.prompt, manifest.config.metrics
        return EncodingSettings(
            max_prompt_tokens=prompt.max_prompt_tokens,
            max_reference_tokens=prompt.max_reference_tokens,
            truncation_side=prompt.truncation_side,
            add_special_tokens=prompt_encoding(manifest.template)["add_special_tokens"],
            rouge_tokenizer=metrics.rouge_tokenizer,
            source=f"{shown(run_dir)}/{MANIFEST_FILE}",
            template=manifest.template,
        )
    defaults = PromptConfig()
    echo(f"no srdata manifest.json found for {path}; encoding with srdata's defaults "
         f"(max_prompt_tokens={defaults.max_prompt_tokens}, max_reference_tokens={defaults.max_reference_tokens}, "
         f"truncation_side={defaults.truncation_side})")
    return EncodingSettings(
        defaults.max_prompt_tokens, defaults.max_reference_tokens, defaults.truncation_side,
        prompt_encoding(None)["add_special_tokens"], MetricsConfig().rouge_tokenizer, "srdata defaults",
    )


@dataclass(frozen=True)
class Example:
    """One training sequence: ``prompt + reference`` ids, cut to ``max_length``."""

    input_ids: list[int]
    prompt_length: int
    cache_start: int = -1  # --teacher-logits: the position of its first scored token in the cached top-K (TeacherLogits.align)

    @property
    def scored_tokens(self) -> int:
        # Targets are input_ids[1:]; a reference token at position 0 (empty prompt) has no prediction.
        return len(self.input_ids) - max(self.prompt_length, 1)


@dataclass
class EncodedData:
    examples: list[Example]
    prompt_ids: list[list[int]]  # the (truncated) prompts, for generation at evaluation
    references: list[str]
    dropped_rows: int  # prompt fills max_length: no reference token left to learn from
    cut_rows: int  # reference cut by max_length
    # With srd_ids (--teacher-logits), per example: its srd_id, the token_ids_digest of its whole
    # prompt + reference (before the max_length cut) and the reference's length then.
    srd_ids: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    reference_lengths: list[int] = field(default_factory=list)


def encode_data(pairs: pl.DataFrame, tokenizer: Any, encoding: EncodingSettings, max_length: int) -> EncodedData:
    """Token ids of every pair by srdata's rules (:func:`srdata.encode_pairs`), cut to ``max_length``.

    When ``pairs`` has an ``srd_id`` column, each kept row's id and the digest of its ids
    (:func:`srdata.steps.teacher.token_ids_digest`) are recorded too.
    """
    from srdata.steps.teacher import token_ids_digest
    from srdata.steps.tokenize import encode_pairs

    prompts, references = pairs["prompt_text"].to_list(), pairs["reference_text"].to_list()
    options = encoding.prompt_options(tokenizer)
    encoded = []
    for start in range(0, len(prompts), 4096):  # bounded tokenizer batches for large files
        encoded += encode_pairs(
            tokenizer,
            prompts[start : start + 4096],
            references[start : start + 4096],
            max_reference_tokens=encoding.max_reference_tokens,
            **options,
        )
    data = EncodedData([], [], [], 0, 0)
    srd_ids = pairs["srd_id"].to_list() if "srd_id" in pairs.columns else None
    for row, (pair, reference) in enumerate(zip(encoded, references)):
        ids = (pair.prompt_ids + pair.reference_ids)[:max_length]
        example = Example(ids, len(pair.prompt_ids))
        if example.scored_tokens < 1:
            data.dropped_rows += 1
            continue
        data.cut_rows += len(pair.prompt_ids) + len(pair.reference_ids) > max_length
        data.examples.append(example)
        data.prompt_ids.append(pair.prompt_ids)
        data.references.append(reference)
        if srd_ids is not None:
            data.srd_ids.append(srd_ids[row])
            data.digests.append(token_ids_digest(pair.prompt_ids, pair.reference_ids))
            data.reference_lengths.append(len(pair.reference_ids))
    return data


def encode_file(path: str | os.PathLike[str], tokenizer: Any, encoding: EncodingSettings, max_length: int,
                *, srd_ids: bool = False) -> tuple[EncodedData, int]:
    """:func:`read_pairs` then :func:`encode_data`; refuses a file where no row has a reference token left to learn.

    Returns the encoded rows and the count of flagged rows left out; ``srd_ids`` as in :func:`read_pairs`.

    Example:
        >>> data, flagged = encode_file("runs/dolly/curriculum/stage-0.parquet", tok, encoding, 512)   # doctest: +SKIP
    """
    pairs, flagged = read_pairs(path, srd_ids=srd_ids)
    data = encode_data(pairs, tokenizer, encoding, max_length)
    if not data.examples:
        raise TrainingSetupError(f"{path}: no row has a reference token within max_length={max_length}")
    return data, flagged


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, width), right-padded
    attention_mask: torch.Tensor  # 1 = real token
    response_mask: torch.Tensor  # 1 = reference token (end-of-sequence included)
    scored_tokens: int
    # --teacher-logits: the cached teacher's (scored tokens, K) ids and log-probs, in the order of response_mask[:, 1:].nonzero()
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None


def collate(examples: Sequence[Example], pad_id: int, device: torch.device, top_k: Any = None) -> Batch:
    """Right-pad a list of examples into tensors (positions equal those of unpadded runs).

    ``top_k``: a :class:`~srd_distill.teacher_logits.TeacherLogits` the examples were aligned
    with; the batch then carries their cached top-K (:meth:`~srd_distill.teacher_logits.TeacherLogits.lookup`).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        response_mask[row, example.prompt_length : n] = True
    top_ids, top_logprobs = top_k.lookup(examples, device) if top_k is not None else (None, None)
    return Batch(
        input_ids.to(device), attention_mask.to(device), response_mask.to(device), sum(e.scored_tokens for e in examples),
        top_ids, top_logprobs,
    )


def split_rows(rows: Sequence[int], parts: int) -> list[list[int]]:
    """Split one step's rows into ``parts`` near-equal micro-batches (none empty).

    Example:
        >>> split_rows([1, 2, 3, 4, 5], 2)
        [[1, 2, 3], [4, 5]]
    """
    parts = min(parts, len(rows))
    size, extra = divmod(len(rows), parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (k < extra)
        out.append(list(rows[start:stop]))
        start = stop
    return out



def curriculum_stage_files(curriculum_dir: Path, n_stages: int, schedule_name: str) -> list[Path]:
    """The stage files a schedule of ``n_stages`` stages trains on, checked (see :func:`checked_curriculum`)."""
    return checked_curriculum(curriculum_dir, n_stages, schedule_name)[0]


def checked_curriculum(curriculum_dir: Path, n_stages: int, schedule_name: str) -> tuple[list[Path], list[str]]:
    """The stage files a schedule of ``n_stages`` stages trains on and their SHA-256, checked.

    The names come from ``curriculum.json`` (as ``srdata export`` writes it), and every file
    must match what it records (bytes, rows, checksum; no path outside the folder): srdata's
    one curriculum reader checks it (:func:`srdata.curriculum.reader.verified_curriculum`, as
    for ``load_curriculum``); only the messages here add what the schedule needs. Without
    it, ``stage-K.parquet`` / ``stage-K.jsonl`` files are looked up directly (a hand-made curriculum: nothing to check
    them against, their checksums are recorded in the run all the same).

    Example:
        >>> files, digests = checked_curriculum(Path("runs/dolly/curriculum"), 3, "paper-gpt2")   # doctest: +SKIP
    """
    from srdata.curriculum.reader import MissingStageFilesError, verified_curriculum

    if not curriculum_dir.is_dir():
        raise CurriculumFilesError(
            f"curriculum folder {curriculum_dir} does not exist; create it with `srdata export RUN_DIR --out {curriculum_dir}`"
        )
    summary_path = curriculum_dir / CURRICULUM_FILE
    if not summary_path.is_file() and (curriculum_dir / MANIFEST_FILE).is_file():
        exported = curriculum_dir / "curriculum"
        hint = (f"its export is {exported}: pass --curriculum {exported}" if (exported / CURRICULUM_FILE).is_file()
                else f"export it first with `srdata export {curriculum_dir}`, then pass --curriculum {exported}")
        raise CurriculumFilesError(f"{curriculum_dir} is a scoring run, not a curriculum; {hint}")
    digests: list[str] = []
    if summary_path.is_file():
        try:
            verified = verified_curriculum(curriculum_dir)
            listed, digests = verified.files, verified.sha256
        except MissingStageFilesError as err:  # named below, with what the schedule needs
            listed = err.files
        except ValueError as err:  # CurriculumIntegrityError: it names the file and says to export again
            raise CurriculumFilesError(str(err)) from None
        source = f"listed in {summary_path}"
    else:
        listed = []
        for s in range(max(n_stages, highest_stage_file(curriculum_dir) + 1)):
            found = [p for p in (curriculum_dir / f"stage-{s}.parquet", curriculum_dir / f"stage-{s}.jsonl") if p.is_file()]
            listed.append(found[0] if found else curriculum_dir / f"stage-{s}.parquet")
        source = f"expected in {curriculum_dir} ({CURRICULUM_FILE} is absent)"
    missing = [p.name for p in listed[:n_stages] if not p.is_file()]
    if len(listed) < n_stages:
        missing += [f"stage-{s}.parquet" for s in range(len(listed), n_stages)]
    if missing:
        raise CurriculumFilesError(
            f"curriculum {curriculum_dir} is missing {', '.join(missing)} ({source}); schedule {schedule_name!r} "
            f"trains {n_stages} stages on stage-0 ... stage-{n_stages - 1}. Re-export with `srdata export RUN_DIR "
            f"--keep {n_stages} --out {curriculum_dir}`, or choose a schedule with as many stages as the curriculum"
        )
    if len(listed) > n_stages:
        raise CurriculumFilesError(
            f"curriculum {curriculum_dir} has {len(listed)} stages but schedule {schedule_name!r} has {n_stages}; "
            f"use a schedule with {len(listed)} stages (e.g. pocl for 4) or export with --keep {n_stages}"
        )
    return listed, digests or [file_sha256(p) for p in listed]


def highest_stage_file(folder: Path) -> int:
    numbers = [int(p.stem.split("-", 1)[1]) for p in folder.glob("stage-*.*") if p.stem.split("-", 1)[1].isdigit()]
    return max(numbers, default=-1)

