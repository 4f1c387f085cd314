"""srdata: Selective Reflection Distillation data curation.

    >>> import srdata
    >>> result = srdata.score(dataset="train.jsonl", model="./student", output="runs/a")  # doctest: +SKIP
    >>> srdata.export_curriculum("runs/a")                                                # doctest: +SKIP
    >>> stages = srdata.load_curriculum("runs/a/curriculum")                              # doctest: +SKIP

Heavy modules (torch, transformers, datasets) load on first use, so ``import srdata``
is quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "score": "srdata.pipeline",
    "ScoreResult": "srdata.pipeline",
    "ScoreConfig": "srdata.config",
    "teach": "srdata.teacher_pass",
    "TeachConfig": "srdata.config",
    "TeachResult": "srdata.teacher_pass",
    "ExportConfig": "srdata.config",
    "Manifest": "srdata.run.folder",
    "read_manifest": "srdata.run.folder",
    "rouge_l": "srdata.steps.rouge",
    "rank": "srdata.steps.rank",
    "export_curriculum": "srdata.curriculum.export",
    "load_curriculum": "srdata.curriculum.reader",
    "CurriculumSampler": "srdata.curriculum.reader",
    "encode_pairs": "srdata.steps.tokenize",
    "rerank_run": "srdata.curriculum.export",
    "CurriculumError": "srdata.curriculum.export",
    "RankingError": "srdata.steps.rank",
    "CurriculumCallback": "srdata.curriculum.reader",
    "curriculum_training_set": "srdata.curriculum.reader",
    "add_chat_messages": "srdata.curriculum.reader",
    "build_report": "srdata.curriculum.report",
    "inspect_run": "srdata.curriculum.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'srdata' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
