"""What several benchmarks share: the testbed's models, reused across runs, and the closing lines of a run.

Example:
    >>> files, teacher, student = testbed_models(Path("/tmp/bench"), SPEC, TEACHER, STUDENT, seed=1)   # doctest: +SKIP
    >>> finish(time.perf_counter(), None, {})
    <BLANKLINE>
    total 0 s
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional


def testbed_models(out: Path, spec: Any, teacher: Any, student: Any, seed: int) -> tuple[Any, Path, Path]:
    """``(files, teacher_dir, student_dir)`` under ``out``: the testbed of ``spec``, its teacher (seed 0) and a student
    warmed up with ``seed``; each one already there (its ``config.json`` written) is reused, not trained again."""
    from srd_distill.testbed_models import train_teacher, warm_up_student
    from srdata.demo.testbed import build_testbed

    files = build_testbed(out / "testbed", spec)
    teacher_dir, student_dir = out / "teacher", out / f"student-{seed}"
    if not (teacher_dir / "config.json").is_file():
        train_teacher(teacher_dir, files.teacher_sft, teacher, seed=0)
    if not (student_dir / "config.json").is_file():
        warm_up_student(student_dir, files.warmup, student, seed=seed)
    return files, teacher_dir, student_dir


def finish(started: float, json_path: Optional[Path], figures: Any, prefix: str = "\n") -> None:
    """Print the run's total seconds (after ``prefix``, e.g. the CPU line) and write ``figures`` to ``json_path`` if given."""
    print(f"{prefix}total {time.perf_counter() - started:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(figures, indent=1) + "\n")
