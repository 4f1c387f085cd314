"""Backends behind one protocol (:class:`Backend`), registered by name; heavy imports stay lazy.

Nothing outside this package imports torch- or vLLM-specific code, so ``import srdata``
stays light and works without vLLM installed. The backends are registered in
:mod:`srdata.backends.registry`; their classes are imported when a run uses them.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import TYPE_CHECKING, Any

from srdata.backends.base import Backend, Generation, GenerationParams, ProgressCallback
from srdata.backends.registry import AUTO, BACKEND_CHOICES, BACKENDS as REGISTERED, unknown_backend

if TYPE_CHECKING:
    from srdata.config import ScoreConfig

__all__ = [
    "Backend", "Generation", "GenerationParams", "ProgressCallback", "BACKEND_CHOICES", "select_backend", "backend_class",
    "backend_packages", "load_backend", "check_device", "resolve_run_dtype",
]


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # the old tuple of names: the registry holds them now
        warnings.warn(
            "srdata.backends.BACKENDS is deprecated; use srdata.backends.registry.BACKEND_CHOICES", DeprecationWarning, stacklevel=2
        )
        return BACKEND_CHOICES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _gpu_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_device(device: str) -> None:
    """Refuse a CUDA device where torch sees none, naming what to pass instead.

    Example:
        >>> check_device("cpu")
    """
    if not device.startswith("cuda") or _gpu_visible():
        return
    try:
        import torch

        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU or driver is visible"
    except ImportError:
        build = "torch is not installed"
    raise ValueError(f"--device {device}: torch sees no CUDA GPU ({build}); pass --device cpu, or --device auto to use a GPU where there is one")


def select_backend(name: str) -> str:
    """The registered backend a name stands for, resolving ``auto``: vLLM when it is importable and a GPU is visible, else transformers.

    Example:
        >>> select_backend("hf")
        'hf'
    """
    if name != AUTO and name not in REGISTERED:
        raise unknown_backend(name)
    if name != AUTO:
        return name
    if importlib.util.find_spec("vllm") is not None and _gpu_visible():
        return "vllm"
    return "hf"


def resolve_run_dtype(backend: str, device: str, dtype: str) -> tuple[str, str]:
    """The dtype a run computes in, resolving ``auto``, and a few words on why (printed, and kept in the manifest).

    vLLM: ``auto`` is bfloat16 (:func:`srdata.backends.vllm_engine.resolve_vllm_dtype`).
    transformers: :func:`srdata.backends.dtype.resolve_dtype_with_reason` (bfloat16 on a
    GPU and on a CPU with AMX or AVX512-BF16, float32 on other CPUs).

    Example:
        >>> resolve_run_dtype("hf", "cpu", "float32")
        ('float32', 'as asked (--dtype float32)')
    """
    if select_backend(backend) == "vllm":
        if dtype == "auto":
            return "bfloat16", "auto: bfloat16 with vLLM"
        return dtype, f"as asked (--dtype {dtype})"
    from srdata.backends.dtype import resolve_device, resolve_dtype_with_reason  # imports torch: lazily

    resolved, reason = resolve_dtype_with_reason(dtype, resolve_device(device))
    return str(resolved).removeprefix("torch."), reason


def decode_attention_kernel(backend: str, device: str, dtype: str) -> str:
    """Which kernel a decode step's attention runs on (kept in the manifest beside the dtype).

    ``srdata-avx512-bf16`` (:mod:`srdata.backends.native`) for the transformers backend in
    bfloat16 on a CPU with AVX512-BF16 and a C compiler; ``torch`` for its other cases;
    ``vllm`` for the vLLM backend.

    Example:
        >>> decode_attention_kernel("hf", "cpu", "float32")
        'torch'
    """
    if select_backend(backend) == "vllm":
        return "vllm"
    from srdata.backends import native  # imports torch: lazily
    from srdata.backends.dtype import resolve_device

    return native.name(resolve_device(device), getattr(native.torch, dtype, None))


def backend_class(name: str) -> type[Backend]:
    """The class of a registered backend (``auto`` resolved here), imported now.

    Example:
        >>> backend_class("hf").__name__
        'HFBackend'
    """
    module, _, cls = REGISTERED[select_backend(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def backend_packages(name: str | None = None) -> tuple[str, ...]:
    """The packages whose versions decide one backend's values, or (no name) every registered backend's.

    Each backend declares them (:attr:`Backend.packages`); the manifest and the Ray replicas
    record their versions.

    Example:
        >>> backend_packages("vllm")
        ('torch', 'transformers', 'vllm')
    """
    names = list(REGISTERED) if name is None else [name]
    return tuple(dict.fromkeys(package for each in names for package in backend_class(each).packages))


def load_backend(config: ScoreConfig, tokenizer: Any = None) -> Backend:
    """Build the backend a scoring run asks for (``config.model.backend``) from the run's settings.

    Each backend reads the settings it uses from the config itself (``from_config``), so a
    setting is declared once, in :mod:`srdata.config`.

    Example:
        >>> config = build_config(dict(dataset="d.jsonl", model="path/to/student", output="runs/a", device="cpu"))  # doctest: +SKIP
        >>> backend = load_backend(config)                                                                      # doctest: +SKIP
    """
    check_device(config.model.device)
    return backend_class(config.model.backend).from_config(config, tokenizer=tokenizer)
