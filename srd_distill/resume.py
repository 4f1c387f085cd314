"""Resumable step checkpoints: an interrupted stage continues from its last saved step, not from its first.

Every ``checkpoint_interval`` optimizer steps (:class:`~srd_distill.settings.TrainSettings`),
:func:`save_step_checkpoint` writes ``RUN/.stage-N.step-K/``, K the steps done in the stage::

    student.safetensors     the float32 master weights (tied weights stored once)
    optimizer.safetensors   AdamW's moments and step counts
    rng.safetensors         torch's CPU (and CUDA) RNG, the stage's shuffling generator, this epoch's row order
    state.json              epoch, next batch, steps, the log window, best eval so far, the learning rate,
                            AdamW's param groups, the float16 loss scaler, metrics lines written in the stage
                            (:class:`~srd_distill.records.StepState`)
    best/                   the best-epoch weights so far (``.stage-N.partial``'s files, hard links)

It follows the rules of every checkpoint here (:mod:`srd_distill.checkpoints`): written as
``.stage-N.step-K.partial`` with the marker first, sealed with checksums last, published by
one rename; then the older step checkpoint of the stage is removed, so only the latest is
kept and a kill at any moment leaves one complete step checkpoint or the previous one.
:func:`restore_step` puts everything back, so the resumed stage computes the same steps.
No file is a pickle: tensors in safetensors, the rest in JSON.

Example:
    >>> StagePosition().next_batch
    0
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from srd_distill.checkpoints import (MARKER_FILE, CHECKSUM_FILE, CheckpointError, is_our_checkpoint, publish_checkpoint,
                                     remove_checkpoint, save_error, start_checkpoint)
from srd_distill.records import StagePosition, StepState
from srd_distill.run_folder import STEP_STATE_FILE, step_folder, step_folders
from srdata.run.io import write_json_atomic

__all__ = ["StagePosition", "save_step_checkpoint", "restore_step"]


def save_step_checkpoint(
    run_dir: Path,
    stage: int,
    position: StagePosition,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    shuffle: torch.Generator,
    metrics_lines: int,
    partial: Path,
) -> Path:
    """Save the resumable state of stage ``stage`` atomically; remove its older step checkpoint; return the folder.

    Example:
        >>> save_step_checkpoint(run_dir, 0, position, student=student, optimizer=optimizer, scaler=scaler,
        ...                      shuffle=shuffle, metrics_lines=12, partial=run_dir / ".stage-0.partial")  # doctest: +SKIP
    """
    from safetensors.torch import save_file, save_model

    final = step_folder(run_dir, stage, position.step)
    tmp = final.with_name(final.name + ".partial")
    start_checkpoint(tmp)
    try:
        save_model(student, str(tmp / "student.safetensors"))
        moments, groups = _flat_optimizer_state(optimizer)
        save_file(moments, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(shuffle, position.order), str(tmp / "rng.safetensors"))
        if is_our_checkpoint(partial):
            _snapshot(partial, tmp / "best")
        state = StepState(stage=stage, **position.model_dump(), metrics_lines=metrics_lines, param_groups=groups,
                          scaler=scaler.state_dict() if scaler.is_enabled() else None)
        write_json_atomic(tmp / STEP_STATE_FILE, state.to_json())
        publish_checkpoint(tmp, final)
    except Exception as err:
        problem = save_error(err, tmp, f"stage {stage}'s step checkpoint")
        if problem is None:
            raise
        remove_checkpoint(tmp)
        raise type(problem)(f"{problem} (or with --checkpoint-interval 0, which saves no step checkpoints)") from err
    for _, _, older in step_folders(run_dir, stage):
        if older != final:
            remove_checkpoint(older)
    return final


def restore_step(
    folder: Path,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    shuffle: torch.Generator,
    partial: Path,
    expected: StagePosition,
) -> StagePosition:
    """Load a (verified) step checkpoint into the stage's objects; rebuild ``partial`` from its best weights; return the position.

    ``expected`` carries the stage's ``total_steps`` and ``rows`` as planned now: a step
    checkpoint of another plan is refused (the run's settings and inputs were compared
    already, so this is a last guard).

    Example:
        >>> position = restore_step(folder, student=student, optimizer=optimizer, scaler=scaler, shuffle=shuffle,
        ...                         partial=partial, expected=StagePosition(total_steps=40, rows=100))  # doctest: +SKIP
    """
    from safetensors.torch import load_file, load_model

    state = StepState.read(folder / STEP_STATE_FILE)  # one written as best_epoch reads as kept_epoch
    if (state.total_steps, state.rows) != (expected.total_steps, expected.rows):
        raise CheckpointError(
            f"{folder} was saved for a stage of {state.total_steps} steps on {state.rows} rows, but this stage has "
            f"{expected.total_steps} steps on {expected.rows} rows; move it away to restart the stage from its beginning"
        )
    device = next(student.parameters()).device
    load_model(student, str(folder / "student.safetensors"), strict=True, device=str(device))
    _load_optimizer_state(optimizer, load_file(str(folder / "optimizer.safetensors")), state.param_groups)
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    shuffle.set_state(rng["shuffle"])
    cuda = sorted(int(key.removeprefix("cuda_")) for key in rng if key.startswith("cuda_"))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([rng[f"cuda_{i}"] for i in cuda])
    if state.scaler and scaler.is_enabled():
        scaler.load_state_dict(state.scaler)
    if (folder / "best").is_dir():
        start_checkpoint(partial)
        _snapshot(folder / "best", partial)
    elif partial.exists():
        remove_checkpoint(partial)
    position = state.position()
    position.order = rng["order"].tolist()
    return position


def _flat_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW's state dict as flat tensors (``"3/exp_avg"``) and JSON-able param groups."""
    full = optimizer.state_dict()
    tensors = {f"{index}/{name}": value.detach().cpu().contiguous()
               for index, values in full["state"].items() for name, value in values.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in full["param_groups"]]
    return tensors, groups


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(shuffle: torch.Generator, order: list[int]) -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(), "order": torch.tensor(order, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _snapshot(source: Path, target: Path) -> None:
    """Copy a checkpoint's files into ``target`` as hard links (a copy where links are not possible).

    The files of a checkpoint are never changed in place (a new save writes new files), so a
    link keeps the old content however the source is replaced later.
    """
    target.mkdir(exist_ok=True)
    for file in source.iterdir():
        if not file.is_file() or file.name in (MARKER_FILE, CHECKSUM_FILE) or (target / file.name).exists():
            continue
        try:
            os.link(file, target / file.name)
        except OSError:
            shutil.copy2(file, target / file.name)
