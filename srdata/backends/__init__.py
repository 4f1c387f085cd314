"""Backends behind one protocol (``generate`` + ``score``); heavy imports stay lazy.

Nothing outside this package imports torch- or vLLM-specific code, so ``import srdata``
stays light and works without vLLM installed.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from srdata.backends.base import Backend, Generation, GenerationParams, ProgressCallback

BACKENDS = ("auto", "hf", "vllm")

__all__ = ["Backend", "Generation", "GenerationParams", "ProgressCallback", "BACKENDS", "select_backend", "load_backend", "check_device"]


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


def load_backend(name: str, model: str, *, tokenizer: Any = None, **options: Any) -> Backend:
    """Build the named backend for ``model`` (a local folder or hub id).

    Example:
        >>> backend = load_backend("hf", "path/to/student", device="cpu", dtype="float32")  # doctest: +SKIP
    """
    resolved = select_backend(name)
    check_device(str(options.get("device", "auto")))
    if resolved == "vllm":
        from srdata.backends.vllm import VLLMBackend  # imported lazily: vLLM is an optional extra

        return VLLMBackend.from_pretrained(model, tokenizer=tokenizer, **options)
    from srdata.backends.hf import HFBackend

    return HFBackend.from_pretrained(model, tokenizer=tokenizer, **options)
