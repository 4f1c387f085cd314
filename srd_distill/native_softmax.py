"""Softmax over the last dimension of bfloat16 tensors, forward and backward, on srdata's native AVX512-BF16 kernel.

Why: :class:`srd_distill.cpu_attention._BlockedAttention` takes the softmax of bf16 score blocks
(SmolLM2, batch 8 x 512: [12, ~350, ~450] per block, 480 per step) and torch's bf16 softmax on a
CPU upcasts in several passes (~0.68 ms a block on 2 threads, 0.33 s of a step).
``srdata/backends/kernels/softmax_bf16.c`` keeps each row in L1: max, exp and sum, scale, in
float32 on the bf16 inputs' exact values, rounded once to bf16, as torch computes it (tests:
within one bf16 ulp of torch's result, and of float64's). The backward,
``probs * (d_probs - sum(d_probs * probs))``, is one dot and one pass, float32 math, bf16 out.

:func:`softmax_bf16` and :func:`softmax_backward_bf16` return ``None`` where the kernel does not
apply (not bfloat16, not on a CPU, an empty last dimension, the kernel unavailable: another CPU,
no compiler, ``SRDATA_NATIVE_KERNELS=0``); the caller then runs torch's ops. Non-contiguous
inputs are copied contiguous first.

Example:
    >>> import torch
    >>> x = torch.randn(3, 5, 40).to(torch.bfloat16)
    >>> p = softmax_bf16(x.clone())
    >>> p is None or (p.float() - torch.softmax(x, -1).float()).abs().max().item() < 4e-3
    True
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional

import torch
from torch import Tensor

from srdata.backends import native

__all__ = ["softmax_backward_bf16", "softmax_bf16", "softmax_check_error", "softmax_kernel"]

SOURCE = native.KERNELS / "softmax_bf16.c"
_ARGTYPES = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_int]
#: Largest error of the load check against float64, relative to the row's largest value (bf16 rounding: <= 2**-8).
CHECK_TOLERANCE = 8e-3


@functools.lru_cache(maxsize=1)
def softmax_kernel() -> Any | None:
    """The checked kernel function, or ``None`` (logged once) where it cannot be used."""
    return native.load(SOURCE, "srdata_softmax_bf16", _ARGTYPES, softmax_check_error, CHECK_TOLERANCE, "bf16 attention softmax")


def _applies(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() >= 1 and t.shape[-1] > 0
               for t in tensors)


def softmax_bf16(scores: Tensor, out: Optional[Tensor] = None) -> Optional[Tensor]:
    """``torch.softmax(scores, -1)`` of a bfloat16 CPU tensor, written into ``out`` (may be ``scores``: in place) or a
    new tensor; ``None`` where the kernel does not apply. Example: the module docstring.
    """
    function = softmax_kernel() if _applies(scores) else None
    if function is None:
        return None
    return _launch(function, 0, scores, None, out, torch.get_num_threads())


def softmax_backward_bf16(grad: Tensor, probs: Tensor, out: Optional[Tensor] = None) -> Optional[Tensor]:
    """``torch._softmax_backward_data(grad, probs, -1, bfloat16)``: ``probs * (grad - sum(grad * probs, -1))``, float32
    math, bf16 out (``out`` may be ``grad``); ``None`` where the kernel does not apply.

    Example:
        >>> p = torch.softmax(torch.randn(2, 20), -1).to(torch.bfloat16)
        >>> d = softmax_backward_bf16(torch.ones(2, 20, dtype=torch.bfloat16), p)
        >>> d is None or d.abs().max().item() < 1e-2  # a constant gradient: none through the softmax
        True
    """
    function = softmax_kernel() if _applies(grad, probs) and grad.shape == probs.shape else None
    if function is None:
        return None
    return _launch(function, 1, grad, probs, out, torch.get_num_threads())


def _launch(function: Any, op: int, x: Tensor, p: Optional[Tensor], out: Optional[Tensor], threads: int) -> Optional[Tensor]:
    x = x.contiguous()  # rows at a fixed stride: the kernel reads row r at r * cols
    p = p.contiguous() if p is not None else None
    if out is None or not out.is_contiguous() or out.shape != x.shape or out.dtype != torch.bfloat16:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    cols = x.shape[-1]
    rows = x.numel() // cols
    status = function(op, x.data_ptr(), p.data_ptr() if p is not None else None, out.data_ptr(), rows, cols,
                      cols, cols, cols, threads)
    return out if status == 0 else None


def softmax_check_error(function: Any) -> float:
    """The kernel's largest error against float64 (forward and backward, row tails, masked entries, 1 and 2 threads),
    relative to each row's largest magnitude."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for rows, cols, threads in ((3, 37, 1), (5, 160, 2), (4, 9, 2)):
        x = (4 * torch.randn(rows, cols, generator=generator)).to(torch.bfloat16)
        x[0, cols // 2:] = torch.finfo(torch.bfloat16).min / 2  # masked keys, as the attention's bias makes them
        probs = _launch(function, 0, x, None, None, threads)
        exact = torch.softmax(x.double(), -1)
        if probs is None or not torch.isfinite(probs).all():
            return float("inf")
        worst = max(worst, float(((probs.double() - exact).abs().amax(-1) / exact.abs().amax(-1)).max()))
        grad = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
        d = _launch(function, 1, grad, probs, None, threads)
        p64 = probs.double()
        want = p64 * (grad.double() - (grad.double() * p64).sum(-1, keepdim=True))
        if d is None:
            return float("inf")
        worst = max(worst, float(((d.double() - want).abs().amax(-1) / want.abs().amax(-1).clamp(min=1e-30)).max()))
    return worst
