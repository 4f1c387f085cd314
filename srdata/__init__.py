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
    "rouge_l": "srdata.rouge",
    "rank": "srdata.rank",
    "export_curriculum": "srdata.export",
    "load_curriculum": "srdata.curriculum",
    "CurriculumSampler": "srdata.curriculum",
    "encode_pairs": "srdata.tokenize",
    "rerank_run": "srdata.export",
    "CurriculumError": "srdata.export",
    "RankingError": "srdata.rank",
    "CurriculumCallback": "srdata.curriculum",
    "curriculum_training_set": "srdata.curriculum",
    "add_chat_messages": "srdata.curriculum",
    "build_report": "srdata.report",
    "inspect_run": "srdata.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'srdata' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
