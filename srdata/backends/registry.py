"""The registered backends: the one place a backend is added, and where ``--backend``'s choices come from.

A backend is registered by name as ``"module:Class"``; the module is imported only when the
backend is used (:func:`srdata.backends.backend_class`), so vLLM stays an optional extra and
``import srdata.config`` imports no backend. Registering a backend here makes it a choice of
``--backend`` and of the config file, lets :func:`srdata.backends.load_backend` build it and
records the versions of its packages in the manifest. The class implements
:class:`srdata.backends.base.Backend` (subclassing it gives the shared defaults).

This module imports nothing from srdata: :mod:`srdata.config` reads the names from it.

Example:
    >>> BACKEND_CHOICES
    ('auto', 'hf', 'vllm')
    >>> BACKENDS["hf"]
    'srdata.backends.hf:HFBackend'
"""

from __future__ import annotations

from typing import Literal

#: name -> "module:Class", imported lazily. Adding a backend is adding a line here.
BACKENDS: dict[str, str] = {
    "hf": "srdata.backends.hf:HFBackend",  # transformers + torch: the CPU default, and CUDA
    "vllm": "srdata.backends.vllm:VLLMBackend",  # pip install 'srdata[vllm]'
}

#: Not a backend: picks one where the run starts (:func:`srdata.backends.select_backend`).
AUTO = "auto"

#: What ``--backend`` accepts: ``auto`` and every registered backend.
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *BACKENDS)

#: The type of ``ModelConfig.backend``: pydantic refuses any other name, listing these
#: (``Input should be 'auto', 'hf' or 'vllm'``), and the CLI makes it a ``click.Choice``.
BackendName = Literal[BACKEND_CHOICES]  # type: ignore[valid-type]  # built from the registry, not written twice


def unknown_backend(name: str) -> ValueError:
    """The error for a backend name that is not registered, naming the ones that are.

    Example:
        >>> str(unknown_backend("tpu"))
        "unknown backend 'tpu'; use one of auto, hf, vllm"
    """
    return ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKEND_CHOICES)}")
