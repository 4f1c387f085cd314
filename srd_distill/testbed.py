"""Deprecated module name: the tiny models of the controlled testbed (TinyModelRecipe, train_teacher, warm_up_student, evaluate_model) moved to :mod:`srd_distill.testbed_models` (issue 26).

``import srd_distill.testbed`` keeps working and warns; every name is read from :mod:`srd_distill.testbed_models`.
"""

from __future__ import annotations

import warnings
from typing import Any

from srd_distill import testbed_models as _moved

warnings.warn("srd_distill.testbed is deprecated; use srd_distill.testbed_models", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`srd_distill.testbed_models`, e.g. ``srd_distill.testbed.X is srd_distill.testbed_models.X``."""
    return getattr(_moved, name)
