"""Backends behind one protocol (``generate`` + ``score``); heavy imports stay lazy.

Nothing outside this package imports torch- or vLLM-specific code, so ``import srdata``
stays light and works without vLLM installed.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from srdata.backends.base import Backend, Generation, GenerationParams, ProgressCallback

if TYPE_CHECKING:
    from srdata.config import ScoreConfig

BACKENDS = ("auto", "hf", "vllm")

__all__ = ["Backend", "Generation", "GenerationParams", "ProgressCallback", "BACKENDS", "select_backend", "load_backend", "check_device", "resolve_run_dtype"]


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
    """Resolve ``auto``: vLLM when it is importable and a GPU is visible, else transformers."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if importlib.util.find_spec("vllm") is not None and _gpu_visible():
        return "vllm"
    return "hf"


def resolve_run_dtype(backend: str, device: str, dtype: str) -> tuple[str, str]:
    """The dtype a run computes in, resolving ``auto``, and a few words on why (printed, and kept in the manifest).

    vLLM: ``auto`` is bfloat16 (:func:`srdata.backends.vllm_engine.resolve_vllm_dtype`).
    transformers: :func:`srdata.backends.dtype.resolve_dtype_with_reason` (bfloat16 on a
    GPU and on a CPU with AMX, float32 on other CPUs).

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


def load_backend(config: ScoreConfig, tokenizer: Any = None) -> Backend:
    """Build the backend a scoring run asks for (``config.model.backend``) from the run's settings.

    Each backend reads the settings it uses from the config itself (``from_config``), so a
    setting is declared once, in :mod:`srdata.config`.

    Example:
        >>> config = build_config(dict(dataset="d.jsonl", model="path/to/student", output="runs/a", device="cpu"))  # doctest: +SKIP
        >>> backend = load_backend(config)                                                                      # doctest: +SKIP
    """
    check_device(config.model.device)
    if select_backend(config.model.backend) == "vllm":
        from srdata.backends.vllm import VLLMBackend  # imported lazily: vLLM is an optional extra

        return VLLMBackend.from_config(config, tokenizer=tokenizer)
    from srdata.backends.hf import HFBackend

    return HFBackend.from_config(config, tokenizer=tokenizer)
