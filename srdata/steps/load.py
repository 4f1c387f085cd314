"""Deprecated module name: reading a dataset, its content identity and the column mapping moved to :mod:`srdata.steps.dataset` (issue 26).

``import srdata.steps.load`` keeps working and warns; every name is read from :mod:`srdata.steps.dataset`.
"""

from __future__ import annotations

import warnings
from typing import Any

from srdata.steps import dataset as _moved

warnings.warn("srdata.steps.load is deprecated; use srdata.steps.dataset", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`srdata.steps.dataset`, e.g. ``srdata.steps.load.X is srdata.steps.dataset.X``."""
    return getattr(_moved, name)
