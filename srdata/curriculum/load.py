"""Deprecated module name: reading an exported curriculum (verified stage files, datasets, sampler) moved to :mod:`srdata.curriculum.reader` (issue 26).

``import srdata.curriculum.load`` keeps working and warns; every name is read from :mod:`srdata.curriculum.reader`.
"""

from __future__ import annotations

import warnings
from typing import Any

from srdata.curriculum import reader as _moved

warnings.warn("srdata.curriculum.load is deprecated; use srdata.curriculum.reader", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    """Every name of :mod:`srdata.curriculum.reader`, e.g. ``srdata.curriculum.load.X is srdata.curriculum.reader.X``."""
    return getattr(_moved, name)
