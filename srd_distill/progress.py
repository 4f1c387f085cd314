"""What a person watching ``srd-distill train`` sees: stage banners, a step bar, the Ctrl-C message.

The bar moves every optimizer step, from the first one, and shows the step's loss, its CE
and KD parts, the KD divergence with and without the T^2 factor, tokens per second and
tqdm's ETA for the stage. Why both KD values: with ``--t2-scaling all`` (the default) the
KD term is ``D_T x T^2``, so when the curriculum raises T from 1 to 1.5 to 2 the logged
``kd_loss`` jumps about 2.25x and 4x at the stage boundaries even when the student's match
to the teacher is unchanged; ``D_T`` alone (``kd_unscaled`` in ``metrics.jsonl``) is the
figure to compare across stages. ``fkl`` and ``sfkl`` are cross-entropy forms (the teacher
entropy at agreement, not 0): for them the bar and ``metrics.jsonl`` (``kd_kl``) also give
the true KL, ``D_T - H(teacher)``, which reads 0 when student and teacher agree.

Before a stage's first step the bar says what is happening (encoding, loading, the first
step), so a long first step never shows as a bare ``0/N``.

Example:
    >>> print(stage_banner(1, 3, rows=10, file_name="stage-1.parquet", epochs=2, steps=6,
    ...                    kd_ratio=0.9, temperature=1.5, t2_factor=2.25))
    === stage 1 (2 of 3): 10 rows from stage-1.parquet, 2 epoch(s) = 6 steps; kd_ratio 0.9, T 1.5; KD term = D_T x T^2 = D_T x 2.25 ===
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["StageProgress", "stage_banner", "stage_preparing", "stage_notes", "stage_done", "interrupted_message"]


def stage_banner(
    index: int,
    n_stages: int,
    *,
    rows: int,
    file_name: str,
    epochs: int,
    steps: int,
    kd_ratio: float,
    temperature: float,
    t2_factor: float,
    notes: Sequence[str] = (),
    epoch_steps: int | None = None,
) -> str:
    """The line printed when a stage starts.

    ``epoch_steps``: the steps the epochs would take; when ``steps`` is fewer (``--max-steps``), the banner says so.

    Example:
        >>> stage_banner(0, 1, rows=5, file_name="a.jsonl", epochs=1, steps=2, kd_ratio=0.8, temperature=1.0, t2_factor=1.0)
        '=== stage 0 (1 of 1): 5 rows from a.jsonl, 1 epoch(s) = 2 steps; kd_ratio 0.8, T 1 ==='
        >>> stage_banner(0, 1, rows=28, file_name="a.jsonl", epochs=1, steps=3, kd_ratio=0.8, temperature=1.0, t2_factor=1.0,
        ...              epoch_steps=7).split(": ", 1)[1]
        '28 rows from a.jsonl, 3 steps (--max-steps 3 stops 1 epoch(s) of 7 steps early); kd_ratio 0.8, T 1 ==='
    """
    scaling = f"; KD term = D_T x T^2 = D_T x {t2_factor:g}" if t2_factor != 1.0 else ""
    extra = "".join(f" ({note})" for note in notes)
    if epoch_steps is not None and steps < epoch_steps:
        length = f"{steps} step{'s' * (steps != 1)} (--max-steps {steps} stops {epochs} epoch(s) of {epoch_steps} steps early)"
    else:
        length = f"{epochs} epoch(s) = {steps} steps"
    return (
        f"=== stage {index} ({index + 1} of {n_stages}): {rows} rows from {file_name}{extra}, {length}; "
        f"kd_ratio {kd_ratio:g}, T {temperature:g}{scaling} ==="
    )


def stage_preparing(index: int, n_stages: int, file_name: str, start_from: str | Path) -> str:
    """The line printed before a stage's slow preparation (encoding the rows, loading the student).

    Example:
        >>> stage_preparing(1, 3, "stage-1.parquet", "runs/kd/stage-0")
        'stage 1 (2 of 3): encoding the rows of stage-1.parquet and loading the student from runs/kd/stage-0 ...'
    """
    return f"stage {index} ({index + 1} of {n_stages}): encoding the rows of {file_name} and loading the student from {start_from} ..."


def stage_notes(*, flagged: int, dropped: int, loss_source: str, gradient_checkpointing: bool) -> list[str]:
    """The banner's notes: rows left out, how the loss is computed, memory levers.

    Example:
        >>> stage_notes(flagged=2, dropped=0, loss_source="loss from full logits", gradient_checkpointing=True)
        ['2 flagged rows left out', 'loss from full logits', 'gradient checkpointing']
    """
    notes = [f"{flagged} flagged rows left out"] * bool(flagged)
    notes += [f"{dropped} rows without room for a reference token left out"] * bool(dropped)
    return notes + [loss_source] + ["gradient checkpointing"] * gradient_checkpointing


def stage_done(index: int, steps: int, seconds: float, checkpoint: Path, memory: str) -> str:
    """The line printed when a stage's checkpoint is in place.

    Example:
        >>> stage_done(0, 6, 12.34, Path("runs/kd/stage-0"), "peak RSS 1.0 GiB")
        '=== stage 0 done: 6 steps in 12.3 s (peak RSS 1.0 GiB); checkpoint runs/kd/stage-0 ==='
    """
    return f"=== stage {index} done: {steps} steps in {seconds:.1f} s ({memory}); checkpoint {checkpoint} ==="


def interrupted_message(run_dir: Path, finished: Sequence[int], current: Optional[int], resume_step: int = 0) -> str:
    """What Ctrl-C prints: what is kept, and that re-running the same command resumes.

    ``resume_step``: the steps of stage ``current`` saved in its latest step checkpoint.

    Example:
        >>> interrupted_message(Path("runs/kd"), [0], 1)
        'interrupted during stage 1; finished stage(s) 0 are saved in runs/kd. Run the same command again to resume: finished stages are kept and stage 1 starts again from its beginning.'
        >>> interrupted_message(Path("runs/kd"), [], 0, resume_step=500).split(": ", 1)[1]
        'finished stages are kept and stage 0 continues from its step checkpoint after step 500.'
    """
    saved = f"finished stage(s) {', '.join(map(str, finished))} are saved in {run_dir}" if finished else f"no stage of {run_dir} was finished yet"
    where = f"during stage {current}" if current is not None else "before training started"
    if current is None:
        redo = "training starts where it would have"
    elif resume_step:
        redo = f"stage {current} continues from its step checkpoint after step {resume_step}"
    else:
        redo = f"stage {current} starts again from its beginning"
    return f"interrupted {where}; {saved}. Run the same command again to resume: finished stages are kept and {redo}."


class StageProgress:
    """A tqdm bar over one stage's optimizer steps, updated every step.

    Example:
        >>> bar = StageProgress(0, 3, total_steps=4, t2_factor=1.0, enabled=False)
        >>> bar.step(loss=2.0, ce_loss=2.5, kd_loss=1.9, kd_unscaled=1.9, tokens=512)
        >>> bar.postfix  # the rate is the stage's tokens over its wall-clock time so far
        'loss 2.000 | ce 2.500 | kd 1.900 | ... tok/s'
        >>> bar.close()
    """

    def __init__(self, index: int, n_stages: int, *, total_steps: int, t2_factor: float, enabled: bool, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.t2_factor = t2_factor
        self.started = time.perf_counter()
        self.tokens = 0
        # Until the first step ends (the slowest: allocation, warm-up), the bar says that it runs.
        self.postfix = f"running step {initial + 1} (the first is the slowest)"
        self.bar = tqdm(
            total=total_steps, initial=initial, desc=f"stage {index} ({index + 1}/{n_stages})", unit="step",
            disable=not enabled, dynamic_ncols=True, postfix=self.postfix,
        )

    def step(self, *, loss: float, ce_loss: float, kd_loss: float, kd_unscaled: float, tokens: int, kd_kl: float | None = None) -> None:
        """One optimizer step done: ``tokens`` = prompt + reference tokens it trained on (padding not counted).

        ``kd_kl``: the true KL (``D_T`` minus the teacher entropy) of a cross-entropy-form loss (fkl, sfkl).
        """
        self.tokens += tokens
        # The stage's mean rate: steady, and right from the first step.
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        kd = f"kd {kd_loss:.3f}" if self.t2_factor == 1.0 else f"kd {kd_loss:.3f} = D_T {kd_unscaled:.3f} x {self.t2_factor:g}"
        kl = f" (KL {kd_kl:.3f})" if kd_kl is not None else ""
        self.postfix = f"loss {loss:.3f} | ce {ce_loss:.3f} | {kd}{kl} | {_count(rate)} tok/s"
        self.bar.set_postfix_str(self.postfix, refresh=False)
        self.bar.update(1)

    def write(self, message: str, echo: Callable[[str], Any]) -> None:
        """Print above the bar, not through it."""
        from tqdm.auto import tqdm

        with tqdm.external_write_mode():
            echo(message)

    def close(self) -> None:
        self.bar.close()


def _count(value: float) -> str:
    """``512``, ``1.2k``, ``3.4M``."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"
