"""Old names that keep working: a renamed module attribute or model attribute warns (DeprecationWarning) naming the new one.

Example:
    >>> __getattr__ = renamed_names("srd_distill.stages", {"StagePlan": "TrainingStage"}, globals())  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any, Callable


def renamed_names(module: str, renamed: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each old name of ``renamed`` (old -> new) from ``namespace`` (the module's globals).

    Example:
        >>> getattr_ = renamed_names("tools", {"old": "new"}, {"new": 1})
        >>> getattr_("old")  # warns: tools.old is deprecated; use tools.new  # doctest: +SKIP
        1
    """

    def __getattr__(name: str) -> Any:
        if name in renamed:
            warnings.warn(f"{module}.{name} is deprecated; use {module}.{renamed[name]}", DeprecationWarning, stacklevel=2)
            return namespace[renamed[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def renamed_property(old: str, new: str) -> property:
    """Attribute ``new`` under its old name ``old``: reading or setting it works and warns (DeprecationWarning) naming ``new``.

    Example:
        >>> from pydantic import BaseModel
        >>> class Engine(BaseModel):
        ...     name: str = "local"
        ...     engine = renamed_property("engine", "name")
        >>> Engine().engine  # warns: Engine.engine is deprecated; use Engine.name  # doctest: +SKIP
        'local'
    """

    def warn(instance: Any) -> None:
        cls = type(instance).__name__
        warnings.warn(f"{cls}.{old} is deprecated; use {cls}.{new}", DeprecationWarning, stacklevel=3)

    def read(instance: Any) -> Any:
        warn(instance)
        return getattr(instance, new)

    def write(instance: Any, value: Any) -> None:
        warn(instance)
        setattr(instance, new, value)

    return property(read, write, doc=f"Deprecated name of :attr:`{new}`.")
