"""The fkl + CE terms of a chunk of bfloat16 logits on srdata's native AVX512-BF16 kernel.

Why: in a bfloat16 srd-distill step on a CPU the LM head's matmuls run at the bf16 peak, and
what is left of the head is float32 elementwise work over ``(tokens, vocab)``: both models'
logits upcast, then max, shift, exp, sum, divide, log, the products and the gradient, ~20
passes (~0.75 s of a 13.6 s SmolLM2 step). ``srdata/backends/kernels/kd_fkl.c`` reads each
row's bf16 logits twice and writes the gradient once, in float32 and (for the next bf16
matmul) in bfloat16; built and checked by :func:`srdata.backends.native.load`.

:func:`fkl_chunk_terms` is what :func:`srd_distill.kd_chunks.chunk_terms` calls first for the
``fkl`` loss (srd-distill's default) when both models' logits are bfloat16 on a CPU and the
compute dtype is float32; it returns ``None`` (and ``chunk_terms`` runs its torch ops) for
every other loss or dtype, where the kernel is unavailable (another CPU, no compiler,
``SRDATA_NATIVE_KERNELS=0``) or a row holds a non-finite logit. Float32 runs never reach it.
The values and gradient are ``chunk_terms``' up to float32 rounding (tests compare both against
float64).

Example:
    >>> import torch
    >>> z = torch.randn(4, 40).to(torch.bfloat16)
    >>> out = fkl_chunk_terms(z, z, torch.tensor([1, 2, 3, 4]), temperature=2.0, kd_scale=0.1, ce_scale=0.1)
    >>> out is None or tuple(out.grad_f32.shape) == (4, 40)
    True
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from srdata.backends import native

__all__ = ["NativeTerms", "fkl_chunk_terms", "fkl_kernel"]

SOURCE = native.KERNELS / "kd_fkl.c"
_ARGTYPES = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] + [ctypes.c_float] * 3
             + [ctypes.c_void_p] * 3 + [ctypes.c_int])
#: Largest error of the load check against float64, relative to each quantity's largest magnitude.
CHECK_TOLERANCE = 1e-4


class NativeTerms(NamedTuple):
    """Per-row values (float64) and the chunk's logit gradient in float32 and bfloat16 (``None`` without one)."""

    kd: Tensor  # (rows,) -sum p log q
    ce: Tensor  # (rows,) -log softmax(z)[y] (0 without targets)
    entropy: Tensor  # (rows,) H(p)
    grad_f32: Optional[Tensor]
    grad_bf16: Optional[Tensor]


@functools.lru_cache(maxsize=1)
def fkl_kernel() -> Any | None:
    """The checked kernel function, or ``None`` (logged once) where it cannot be used."""
    return native.load(SOURCE, "srdata_kd_fkl_bf16", _ARGTYPES, fkl_check_error, CHECK_TOLERANCE, "KD loss (fkl + CE)")


def fkl_chunk_terms(z_s: Tensor, z_t: Tensor, targets: Optional[Tensor], *, temperature: float, kd_scale: float,
                    ce_scale: float, need_grad: bool = True) -> Optional[NativeTerms]:
    """fkl and CE of ``(rows, vocab)`` bfloat16 student/teacher logits; the gradient ``kd_scale (q - p) + ce_scale (q_1 - onehot(y))``.

    ``None`` where the kernel does not apply (see the module docstring): the caller computes it with torch.
    Example: the module docstring.
    """
    if (z_s.dtype != torch.bfloat16 or z_t.dtype != torch.bfloat16 or z_s.device.type != "cpu" or z_t.device.type != "cpu"
            or z_s.dim() != 2 or z_s.shape != z_t.shape or z_s.shape[1] == 0):
        return None
    function = fkl_kernel()
    if function is None:
        return None
    return _launch(function, z_s, z_t, targets, temperature, kd_scale, ce_scale, need_grad, torch.get_num_threads())


def _launch(function: Any, z_s: Tensor, z_t: Tensor, targets: Optional[Tensor], temperature: float, kd_scale: float,
            ce_scale: float, need_grad: bool, threads: int) -> Optional[NativeTerms]:
    if z_s.stride(1) != 1:
        z_s = z_s.contiguous()
    if z_t.stride(1) != 1:
        z_t = z_t.contiguous()
    rows, vocab = z_s.shape
    y = targets.to(torch.int64).contiguous() if targets is not None else None
    values = torch.empty(rows, 3, dtype=torch.float64)
    g32 = torch.empty(rows, vocab, dtype=torch.float32) if need_grad else None
    g16 = torch.empty(rows, vocab, dtype=torch.bfloat16) if need_grad else None
    status = function(
        z_s.data_ptr(), z_t.data_ptr(), rows, vocab, z_s.stride(0), z_t.stride(0), y.data_ptr() if y is not None else None,
        float(temperature), float(kd_scale), float(ce_scale), g16.data_ptr() if g16 is not None else None,
        g32.data_ptr() if g32 is not None else None, values.data_ptr(), threads,
    )
    if status != 0:
        return None
    return NativeTerms(values[:, 0], values[:, 1], values[:, 2], g32, g16)


def reference(z_s: Tensor, z_t: Tensor, targets: Optional[Tensor], temperature: float, kd_scale: float,
              ce_scale: float) -> NativeTerms:
    """What the kernel computes, in float64 with torch (for the load check and tests)."""
    s = torch.log_softmax(z_s.double() / temperature, -1)
    t = torch.log_softmax(z_t.double() / temperature, -1)
    p, q = t.exp(), s.exp()
    log_q1 = torch.log_softmax(z_s.double(), -1)
    grad = kd_scale * (q - p)
    ce = torch.zeros(z_s.shape[0], dtype=torch.float64)
    if targets is not None:
        ce = -log_q1.gather(-1, targets[:, None]).squeeze(-1)
        grad = grad + ce_scale * (log_q1.exp() - torch.nn.functional.one_hot(targets, z_s.shape[1]).double())
    return NativeTerms(-(p * s).sum(-1), ce, -(p * t).sum(-1), grad, None)


def fkl_check_error(function: Any) -> float:
    """The kernel's largest error against :func:`reference` on random rows (vocab tails, T = 1 and 2), relative."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for rows, vocab, temperature, with_targets in ((3, 37, 2.0, True), (5, 160, 1.0, True), (4, 50, 0.7, True), (2, 64, 0.5, False)):
        z_s = (3 * torch.randn(rows, vocab, generator=generator)).to(torch.bfloat16)
        z_t = (3 * torch.randn(rows, vocab, generator=generator)).to(torch.bfloat16)
        y = torch.randint(0, vocab, (rows,), generator=generator) if with_targets else None
        ours = _launch(function, z_s, z_t, y, temperature, 0.3, 0.2 if with_targets else 0.0, True, 1)
        if ours is None:
            return float("inf")
        exact = reference(z_s, z_t, y, temperature, 0.3, 0.2 if with_targets else 0.0)
        for got, want in zip(ours[:4], exact[:4]):
            worst = max(worst, float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)))
    return worst
