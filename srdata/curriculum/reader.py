"""Feed an exported SRD curriculum to a trainer: Hugging Face datasets, a sampler that
walks the stages, and a transformers callback that follows the stage switches.

Two ways to train on a curriculum:

1. The paper's way: one ``trainer.train()`` per stage on ``load_curriculum(out)["stage_s"]``,
   each stage starting from the previous stage's weights with a fresh optimizer.
2. One training run: ``CurriculumSampler`` yields the whole schedule (stage 0 for its
   epochs or steps, then stage 1, ...) as one long sequence of row indices, so any
   trainer that accepts a sampler sees an ordinary, fixed-length epoch;
   ``CurriculumCallback`` tells a ``transformers.Trainer`` when a stage starts.

The sampler is a plain iterable of row indices (all a ``torch.utils.data.DataLoader``
asks of a sampler), so this module imports neither torch nor, until ``CurriculumCallback``
is first used, transformers.

What is read is what was exported: :func:`verified_curriculum` (used by ``load_curriculum``,
``srdata report`` and srd-distill) reads ``curriculum.json`` and refuses, naming the file and
the fix (export again), a stage path that is absolute or leads out of the folder (never
opened), a missing file, and a file whose bytes, SHA-256 or row count differ from what the
export recorded (a flipped bit, an edited file, files of two exports), and a folder left by
an export killed while it replaced its files. Exports written before checksums were
recorded are checked by bytes and rows, with a warning.
"""

from __future__ import annotations

import bisect
import json
import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np

from srdata.curriculum.cut import LAYOUTS
from srdata.run.names import CURRICULUM_FILE, PUBLISHING_KEY  # noqa: F401 - PUBLISHING_KEY: re-exported
from srdata.run.io import IntegrityError, file_sha256
from srdata.curriculum.groups import STRATIFIED_COLUMN
from srdata.steps.rank import DIFFICULTY_COLUMN

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)
STAGE_PREFIX = "stage_"


def load_curriculum(path: str | os.PathLike[str], cache_dir: str | None = None) -> "datasets.DatasetDict":
    """Load every stage of an export as a ``datasets.DatasetDict`` (``stage_0``, ``stage_1``, ...).

    ``path`` is the export folder, its ``curriculum.json``, or a run folder holding the
    default ``curriculum/`` export, local or in object storage (``s3://...``, read through a
    verified local copy: :mod:`srdata.curriculum.remote_read`). Every stage file is checked against ``curriculum.json``
    first (:func:`verified_curriculum`): a changed, damaged or foreign file is refused.

    Example:
        >>> stages = load_curriculum("runs/dolly/curriculum")      # doctest: +SKIP
        >>> list(stages), stages["stage_0"].num_rows               # doctest: +SKIP
        (['stage_0', 'stage_1', 'stage_2'], 3750)
    """
    import datasets

    from srdata.curriculum.remote_read import local_curriculum

    curriculum = verified_curriculum(local_curriculum(path))  # s3://...: a verified local copy
    builder = "parquet" if curriculum.summary["settings"]["format"] == "parquet" else "json"
    data_files = {f"{STAGE_PREFIX}{stage['stage']}": str(file) for stage, file in zip(curriculum.stages, curriculum.files)}
    return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)


class CurriculumIntegrityError(IntegrityError):
    """A curriculum folder does not hold what its ``curriculum.json`` records; the message names the file and the fix."""


class MissingStageFilesError(FileNotFoundError):
    """``curriculum.json`` lists stage files that are not there; ``files`` are all it lists (checked to lie inside
    ``folder``), stage 0 first, so a caller can name the missing ones its own way (srd-distill's schedule hint)."""

    def __init__(self, message: str, folder: Path, files: list[Path]) -> None:
        super().__init__(message)
        self.folder, self.files = folder, files


@dataclass(frozen=True)
class VerifiedCurriculum:
    """An export whose stage files were checked against its ``curriculum.json``.

    ``files[i]`` is the file of ``stages[i]`` (sorted by stage number) and ``sha256[i]`` its
    checksum as computed now (equal to the recorded one where one was recorded: exports
    written before srdata recorded checksums carry none, see :func:`verified_curriculum`).
    """

    folder: Path
    summary: dict[str, Any]
    files: list[Path]
    sha256: list[str]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return sorted(self.summary["stages"], key=lambda stage: stage["stage"])


def verified_stage_files(path: str | os.PathLike[str]) -> list[Path]:
    """The stage files of an export, stage 0 first, each checked against ``curriculum.json``.

    Shorthand for ``verified_curriculum(path).files``.

    Example:
        >>> [p.name for p in verified_stage_files("runs/dolly/curriculum")]   # doctest: +SKIP
        ['stage-0.parquet', 'stage-1.parquet', 'stage-2.parquet']
    """
    return verified_curriculum(path).files


def verified_curriculum(path: str | os.PathLike[str]) -> VerifiedCurriculum:
    """Read an export's ``curriculum.json`` and check every stage file it lists, or refuse.

    ``path`` is the export folder, its ``curriculum.json``, or a run folder holding the
    default ``curriculum/`` export. A stage path that is absolute or leads out of the folder
    (``..``, a symbolic link) is refused and never opened. Each file must have the bytes, the
    rows and the SHA-256 recorded when it was exported; otherwise a
    :class:`CurriculumIntegrityError` (a ``ValueError``) names the file and says to export
    again. Exports written before srdata recorded checksums are checked by size and rows
    only, with a warning in the log: export again to have them checked fully.

    Example:
        >>> curriculum = verified_curriculum("runs/dolly/curriculum")   # doctest: +SKIP
        >>> curriculum.summary["settings"]["layout"], len(curriculum.files)   # doctest: +SKIP
        ('cumulative', 3)
    """
    folder = _curriculum_folder(Path(path))
    summary = _read_summary(folder)
    if summary.get(PUBLISHING_KEY):
        raise CurriculumIntegrityError(
            f"an export into {folder} was interrupted while it replaced its files: its stage files may belong to two "
            f"exports; run `srdata export` again into {folder}"
        )
    stages = sorted(summary["stages"], key=lambda stage: stage["stage"])
    files = [_stage_path(folder, stage) for stage in stages]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MissingStageFilesError(f"curriculum in {folder} lists stage files that are missing: {', '.join(missing)}; export again",
                                     folder, files)
    unchecked = [f.name for f, stage in zip(files, stages) if not stage.get("sha256")]
    if unchecked:
        logger.warning("%s records no checksum of %s (exported by an older srdata): checked by size and rows only; "
                       "export again to have them checked fully", folder / CURRICULUM_FILE, ", ".join(unchecked))
    builder = "parquet" if summary["settings"]["format"] == "parquet" else "json"
    digests = [_check_stage_file(file, stage, builder) for file, stage in zip(files, stages)]
    return VerifiedCurriculum(folder, summary, files, digests)


def _read_summary(folder: Path) -> dict[str, Any]:
    summary_path = folder / CURRICULUM_FILE
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        stages = summary["stages"]
        if not isinstance(stages, list) or not stages or not all(_is_stage_entry(stage) for stage in stages):
            raise TypeError("stages")
        summary["settings"]["format"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CurriculumIntegrityError(
            f"{summary_path} is not a readable curriculum summary ({type(err).__name__}: {err}); "
            f"run `srdata export` again into {folder}"
        ) from None
    return summary


def _is_stage_entry(stage: Any) -> bool:
    return isinstance(stage, dict) and isinstance(stage.get("stage"), int) and isinstance(stage.get("file"), str) and isinstance(stage.get("rows"), int)


def _stage_path(folder: Path, stage: dict[str, Any]) -> Path:
    """The stage's file inside ``folder``; a path leading anywhere else is refused before it is opened."""
    name = stage["file"]
    relative = Path(name)
    inside = not relative.is_absolute() and ".." not in relative.parts and name.strip() != ""
    file = folder / relative
    if inside and (file.exists() or file.is_symlink()):
        inside = file.resolve().is_relative_to(folder.resolve())
    if not inside:
        raise CurriculumIntegrityError(
            f"{folder / CURRICULUM_FILE} lists stage {stage['stage']}'s file as {name!r}, which is not a file inside "
            f"{folder}; curriculum.json was edited or damaged: run `srdata export` again into {folder}"
        )
    return file


def _check_stage_file(file: Path, stage: dict[str, Any], builder: str) -> str:
    """Refuse a stage file that is not the one ``curriculum.json`` describes (bytes, checksum, rows); return its SHA-256.

    An export interrupted between writing its stage files and its summary, another
    process writing into the folder, or a flipped bit could leave files that still parse;
    loading them would silently train on wrong stages.
    """
    fix = f"run `srdata export` again into {file.parent}"
    if "file_bytes" in stage and file.stat().st_size != stage["file_bytes"]:
        raise CurriculumIntegrityError(
            f"stage file {file} is {file.stat().st_size} bytes, but curriculum.json lists {stage['file_bytes']}: "
            f"the file was changed, damaged, or the folder mixes files of two exports; {fix}"
        )
    digest = file_sha256(file)
    if stage.get("sha256") and digest != stage["sha256"]:
        raise CurriculumIntegrityError(
            f"stage file {file} does not match the checksum curriculum.json records for it: "
            f"the file was changed or damaged after it was exported; {fix}"
        )
    try:
        rows = _count_rows(file, builder)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise CurriculumIntegrityError(f"stage file {file} cannot be read ({err}); {fix}") from None
    if rows != stage["rows"]:
        raise CurriculumIntegrityError(
            f"stage file {file} holds {rows} rows, but curriculum.json lists {stage['rows']}: "
            f"the folder mixes files of two exports (was an export interrupted?); {fix}"
        )
    return digest


def _count_rows(file: Path, builder: str) -> int:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    with file.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _curriculum_folder(path: Path) -> Path:
    for candidate in (path, path.parent if path.name == CURRICULUM_FILE else None, path / "curriculum"):
        if candidate is not None and (candidate / CURRICULUM_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no {CURRICULUM_FILE} in {path} (or {path / 'curriculum'}); create one with `srdata export RUN_DIR`")


def curriculum_training_set(curriculum: "datasets.DatasetDict") -> tuple["datasets.Dataset", list[int]]:
    """One dataset holding every kept row, and the stage in which each row is first trained.

    Works for both export layouts (cumulative: the last stage already holds every row;
    disjoint: the stages are concatenated) and for stratified exports (``--stratify``: the
    stages were cut from ``stratified_rank``, not from ``difficulty_rank``). Feed the
    second value to ``CurriculumSampler``.

    Example:
        >>> train, stage_of_row = curriculum_training_set(load_curriculum(out))   # doctest: +SKIP
        >>> sampler = CurriculumSampler(stage_of_row, epochs_per_stage=8)         # doctest: +SKIP
    """
    import datasets

    names = sorted(curriculum, key=lambda name: int(name.removeprefix(STAGE_PREFIX)))
    stages = [curriculum[name] for name in names]
    # The order the stages were cut from: a stage is a range of it.
    column = STRATIFIED_COLUMN if STRATIFIED_COLUMN in stages[0].column_names else DIFFICULTY_COLUMN
    ends = np.array([_positions(stage, column).max() for stage in stages])  # last position of each stage
    cumulative = all(_positions(stage, column).min() == 1 for stage in stages)
    train = stages[-1] if cumulative else datasets.concatenate_datasets(stages)
    return train, np.searchsorted(ends, _positions(train, column), side="left").tolist()


def add_chat_messages(dataset: "datasets.Dataset", curriculum: str | os.PathLike[str]) -> "datasets.Dataset":
    """Add a ``messages`` column (user turn(s), then the reference as the assistant's turn).

    For trainers that apply the chat template themselves (TRL's GKD and SFT trainers on
    ``messages``): ``prompt_text`` is already rendered, so wrapping it in a chat turn would
    template it twice. The turns are rebuilt from the original columns the run recorded
    (``curriculum`` is the export folder, as for :func:`load_curriculum`), exactly as
    ``--template chat`` rendered them.

    Example:
        >>> train, stage_of_row = curriculum_training_set(load_curriculum("runs/a/curriculum"))  # doctest: +SKIP
        >>> train = add_chat_messages(train, "runs/a/curriculum")                                 # doctest: +SKIP
        >>> train[0]["messages"][-1]["role"]                                                      # doctest: +SKIP
        'assistant'
    """
    from srdata.steps.dataset import ColumnMapping
    from srdata.curriculum.source import read_run_manifest
    from srdata.steps.prompts import chat_messages

    from srdata.curriculum.remote_read import local_curriculum, run_manifest_copy
    from srdata.run.storage import is_remote

    folder = _curriculum_folder(local_curriculum(curriculum))
    source = json.loads((folder / CURRICULUM_FILE).read_text())["source"]["run_dir"]
    run_dir = run_manifest_copy(source) if is_remote(source) else Path(source)  # a run in object storage: its manifest
    columns = read_run_manifest(run_dir).columns
    if not columns:
        raise ValueError(f"the run {run_dir} records no column mapping in its manifest; score it with this srdata version")
    mapping = ColumnMapping(**columns)
    return dataset.map(lambda row: {"messages": chat_messages(row, mapping)}, desc="chat messages")


def _positions(stage: "datasets.Dataset", column: str = DIFFICULTY_COLUMN) -> np.ndarray:
    return np.asarray(stage.with_format("numpy")[column])


class CurriculumSampler:
    """Yield row indices stage after stage: easy rows first, harder rows joining later.

    ``stage_of_row[i]`` is the stage in which row ``i`` is first trained (0 = easiest).
    With ``layout="cumulative"`` (the paper) stage s draws from rows of stages ``0..s``;
    with ``"disjoint"`` only from rows of stage s. Each stage runs ``epochs_per_stage``
    passes over its rows (``by="epoch"``) or ``steps_per_stage`` optimizer steps of
    ``samples_per_step`` rows (``by="step"``). Rows are reshuffled every pass from
    ``seed``, the stage, the pass and the epoch set by ``set_epoch``, so every process
    of a distributed run draws the same sequence.

    ``samples_per_step`` is the number of rows per optimizer step (batch size x gradient
    accumulation x processes). By epoch, each stage is padded with rows of the same stage
    to a whole number of steps, so that no step mixes two stages.

    Example:
        >>> sampler = CurriculumSampler([0, 0, 1, 1, 2, 2], epochs_per_stage=1, shuffle=False)
        >>> list(sampler)
        [0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        stage_of_row: Sequence[int],
        *,
        layout: Literal["cumulative", "disjoint"] = "cumulative",
        by: Literal["epoch", "step"] = "epoch",
        epochs_per_stage: int | Sequence[int] = 1,
        steps_per_stage: int | Sequence[int] | None = None,
        samples_per_step: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        stage_of_row = np.asarray(stage_of_row, dtype=np.int64)
        self.num_stages = _check_stages(stage_of_row)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        if by not in ("epoch", "step"):
            raise ValueError(f"by must be 'epoch' or 'step', got {by!r}")
        if samples_per_step < 1:
            raise ValueError(f"samples_per_step must be at least 1, got {samples_per_step}")
        self.layout, self.by, self.samples_per_step, self.shuffle, self.seed = layout, by, samples_per_step, shuffle, seed
        self.epoch = 0
        self.pools = [_stage_pool(stage_of_row, s, layout) for s in range(self.num_stages)]
        self.stage_lengths = self._stage_lengths(epochs_per_stage, steps_per_stage)
        self.boundaries = np.cumsum(self.stage_lengths).tolist()  # end position of every stage

    def _stage_lengths(self, epochs_per_stage: int | Sequence[int], steps_per_stage: int | Sequence[int] | None) -> list[int]:
        if self.by == "step":
            if steps_per_stage is None:
                raise ValueError("by='step' needs steps_per_stage")
            steps = _per_stage(steps_per_stage, self.num_stages, "steps_per_stage")
            return [n * self.samples_per_step for n in steps]
        epochs = _per_stage(epochs_per_stage, self.num_stages, "epochs_per_stage")
        step = self.samples_per_step
        return [-(-n * len(pool) // step) * step for n, pool in zip(epochs, self.pools)]

    def __len__(self) -> int:
        return int(self.boundaries[-1])

    def __iter__(self) -> Iterator[int]:
        for stage in range(self.num_stages):
            yield from self.stage_indices(stage)

    def stage_indices(self, stage: int) -> Iterator[int]:
        """The row indices drawn during ``stage``, pass after pass, cut to the stage length."""
        pool, remaining, pass_number = self.pools[stage], self.stage_lengths[stage], 0
        while remaining > 0:
            order = self._pass_order(pool, stage, pass_number)[:remaining]
            remaining -= len(order)
            pass_number += 1
            yield from order.tolist()

    def _pass_order(self, pool: np.ndarray, stage: int, pass_number: int) -> np.ndarray:
        if not self.shuffle:
            return pool
        rng = np.random.default_rng([self.seed, self.epoch, stage, pass_number])
        return rng.permutation(pool)

    def set_epoch(self, epoch: int) -> None:
        """Called by trainers between epochs: a new epoch draws new shuffles."""
        self.epoch = epoch

    def stage_at(self, position: int) -> int:
        """The stage of the sample at ``position`` in the sequence (clamped to the last stage)."""
        return min(bisect.bisect_right(self.boundaries, position), self.num_stages - 1)

    def stage_of_step(self, step: int) -> int:
        """The stage that optimizer step ``step`` (0-based) trains on."""
        return self.stage_at(step * self.samples_per_step)


def _check_stages(stage_of_row: np.ndarray) -> int:
    if stage_of_row.ndim != 1 or stage_of_row.size == 0:
        raise ValueError("stage_of_row must be a non-empty list of stage numbers, one per row")
    if stage_of_row.min() < 0:
        raise ValueError("stage numbers must be >= 0")
    num_stages = int(stage_of_row.max()) + 1
    empty = sorted(set(range(num_stages)) - set(np.unique(stage_of_row).tolist()))
    if empty:
        raise ValueError(f"stages {empty} have no rows; number the stages 0..{num_stages - 1} without gaps")
    return num_stages


def _stage_pool(stage_of_row: np.ndarray, stage: int, layout: str) -> np.ndarray:
    in_stage = stage_of_row <= stage if layout == "cumulative" else stage_of_row == stage
    return np.flatnonzero(in_stage)


def _per_stage(value: int | Sequence[int], num_stages: int, name: str) -> list[int]:
    values = [value] * num_stages if isinstance(value, numbers.Integral) else list(value)
    if len(values) != num_stages:
        raise ValueError(f"{name} has {len(values)} values for {num_stages} stages")
    if any(not isinstance(v, numbers.Integral) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive integers, got {values}")
    return values


def _make_callback_class() -> type:
    """Build ``CurriculumCallback`` on first use, importing transformers only then."""
    from transformers import TrainerCallback

    class CurriculumCallback(TrainerCallback):
        """Follow a ``CurriculumSampler`` inside ``transformers.Trainer`` (and TRL trainers).

        At the step where a new stage starts it records the switch in ``switches``
        (``(global_step, stage)`` pairs), calls ``on_stage_start(stage, state)`` (to change
        a KD ratio or temperature per stage, for instance) and, with
        ``save_at_stage_end=True``, saves a checkpoint at the end of every stage.

        Example:
            >>> callback = CurriculumCallback(sampler, save_at_stage_end=True)   # doctest: +SKIP
            >>> trainer.add_callback(callback)                                   # doctest: +SKIP
        """

        def __init__(
            self,
            sampler: CurriculumSampler,
            on_stage_start: Callable[[int, Any], None] | None = None,
            save_at_stage_end: bool = False,
        ) -> None:
            self.sampler = sampler
            self.on_stage_start = on_stage_start
            self.save_at_stage_end = save_at_stage_end
            self.stage: int | None = None
            self.switches: list[tuple[int, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            if per_step != self.sampler.samples_per_step:
                raise ValueError(
                    f"the sampler was built with samples_per_step={self.sampler.samples_per_step}, but each optimizer "
                    f"step of this trainer uses {per_step} rows (batch x accumulation x processes); rebuild the sampler "
                    f"with samples_per_step={per_step}"
                )
            self._enter(self.sampler.stage_of_step(state.global_step), state)

        def on_step_end(self, args, state, control, **kwargs):
            upcoming = self.sampler.stage_of_step(state.global_step)
            if upcoming != self.stage:
                if self.save_at_stage_end:
                    control.should_save = True
                self._enter(upcoming, state)

        def _enter(self, stage: int, state) -> None:
            self.stage = stage
            self.switches.append((state.global_step, stage))
            logger.info("curriculum stage %d starts at step %d", stage, state.global_step)
            if self.on_stage_start is not None:
                self.on_stage_start(stage, state)

    CurriculumCallback.__qualname__ = "CurriculumCallback"
    CurriculumCallback.__module__ = __name__
    return CurriculumCallback


def __getattr__(name: str) -> Any:
    if name == "CurriculumCallback":
        callback_class = _make_callback_class()
        globals()[name] = callback_class
        return callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
