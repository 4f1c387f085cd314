"""A Llama/Qwen2 MLP's activation ``silu(gate) * up`` in bfloat16 on srdata's native kernel, for CPU bf16 runs.

Under CPU bf16 autocast an MLP's gate and up projections come out in bfloat16, and torch runs
``silu`` (a pass over a (tokens, intermediate) tensor), the product (another), and back
``silu_backward`` and two products: on SmolLM2 (batch 8 x 512) ~0.2 s of a bf16 step, for
the student and again for the bf16 teacher's forward. ``srdata/backends/kernels/swiglu.c``
computes the forward in one pass and both input gradients in one pass back, in float32,
each output rounded to bf16 once: :class:`SwiGLUFunction`.

Numerics: torch rounds ``silu(g)`` to bf16 and the product again; the kernel rounds once, so its
forward is within half a bf16 ulp of the float64 value and within one bf16 ulp of torch's
(tests/test_cpu_mlp.py checks both); the gradients likewise (torch rounds ``dh * u`` before
``silu_backward``).

:func:`swiglu_mlps` installs an instance ``forward`` for the duration of a block on the MLPs whose
forward is transformers' ``LlamaMLP.forward`` code (Qwen2, Mistral, ... copy it) with a SiLU
``act_fn``; each call uses the kernel only on CPU half autocast with bf16 gate/up outputs where the
kernel built (``srdata.backends.native``: AVX512-BF16, a C compiler, not ``SRDATA_NATIVE_KERNELS=0``),
and the model's own code otherwise. Outside CPU bf16 autocast nothing is installed (float32 runs
never see it). A layer that gradient checkpointing recomputes in the backward pass (outside the block)
runs the kernel again where its forward did (:func:`swiglu_on_recompute`): the same values, the same
saved tensors.

Example:
    >>> from transformers import LlamaConfig
    >>> from transformers.models.llama.modeling_llama import LlamaMLP
    >>> mlp = LlamaMLP(LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32))
    >>> with swiglu_mlps(mlp):  # no autocast: untouched
    ...     "forward" in vars(mlp)
    False
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import types
import weakref
from typing import Any, Callable, Iterator

import torch

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_check_error", "swiglu_kernel", "swiglu_mlps", "swiglu_on_recompute"]

#: Largest error of the load check against float64, relative to each output's largest magnitude (bf16: <= 2^-8).
CHECK_TOLERANCE = 8e-3


@functools.lru_cache(maxsize=1)
def swiglu_kernel() -> Any | None:
    """The checked native SwiGLU kernel, or ``None`` (logged once) where it cannot be used (then torch's ops run)."""
    from srdata.backends import native

    argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int]
    return native.load(native.KERNELS / "swiglu.c", "srdata_swiglu", argtypes, swiglu_check_error, CHECK_TOLERANCE, "SwiGLU")


def _launch(kernel: Any, gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor | None = None,
            threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One kernel call on contiguous bf16 tensors of one shape: (h, None) forward, (d_gate, d_up) with ``grad``."""
    threads = threads or torch.get_num_threads()
    a = torch.empty(gate.shape, dtype=torch.bfloat16)
    b = torch.empty(gate.shape, dtype=torch.bfloat16) if grad is not None else None
    kernel(0 if grad is None else 1, gate.data_ptr(), up.data_ptr(), grad.data_ptr() if grad is not None else None,
           a.data_ptr(), b.data_ptr() if b is not None else None, gate.numel(), threads)
    return a, b


def reference(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """h, d_gate, d_up in float64 (for the load check and tests)."""
    g, u, d = gate.double(), up.double(), grad.double()
    s = torch.sigmoid(g)
    return g * s * u, d * u * s * (1 + g * (1 - s)), d * g * s


def swiglu_check_error(kernel: Any) -> float:
    """The kernel's largest error against :func:`reference` (sizes with tails, 1 and 2 threads), relative to each
    output's largest magnitude."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for n, threads in ((37, 2), (160, 1), (5, 2)):
        gate, up, grad = ((4 * torch.randn(n, generator=generator)).bfloat16() for _ in range(3))
        h = _launch(kernel, gate, up, threads=threads)[0]
        d_gate, d_up = _launch(kernel, gate, up, grad, threads=threads)
        for got, want in zip((h, d_gate, d_up), reference(gate, up, grad)):
            worst = max(worst, float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    return worst


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` of two bf16 CPU tensors of one shape on the native kernel (forward and backward)."""

    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _launch(swiglu_kernel(), gate, up)[0]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        d_gate, d_up = _launch(swiglu_kernel(), gate, up, grad.to(torch.bfloat16).contiguous())
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` on the kernel, or ``None`` where it does not apply (another dtype or device, shapes that
    differ, no kernel): the caller then runs torch's ops.

    Example:
        >>> g = torch.randn(3, 20).bfloat16()
        >>> h = swiglu(g, g)
        >>> h is None or h.dtype == torch.bfloat16
        True
    """
    if (gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16 or gate.device.type != "cpu"
            or up.device.type != "cpu" or gate.shape != up.shape or gate.numel() == 0):
        return None
    if swiglu_kernel() is None:
        return None
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return _launch(swiglu_kernel(), gate.contiguous(), up.contiguous())[0]  # inference (the teacher): nothing saved


def _is_llama_mlp(module: torch.nn.Module) -> bool:
    """An MLP whose forward is transformers' ``LlamaMLP.forward`` code, with a SiLU ``act_fn`` and linear projections."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    forward = getattr(type(module), "forward", None)
    code, llama = getattr(forward, "__code__", None), LlamaMLP.forward.__code__
    same = code is not None and (code.co_code, code.co_consts, code.co_names) == (llama.co_code, llama.co_consts, llama.co_names)
    silu = type(getattr(module, "act_fn", None)) in (SiLUActivation, torch.nn.SiLU)
    linears = all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
    return same and silu and linears


def _half_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP.forward`` with the activation on the kernel where it applies (see the module docstring)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = swiglu(gate, up) if _half_autocast() else None
    if h is None:
        h = self.act_fn(gate) * up  # the model's own code
    return self.down_proj(h)


_ACTIVE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models inside swiglu_mlps now


@contextlib.contextmanager
def swiglu_mlps(model: torch.nn.Module) -> Iterator[None]:
    """Within the block and CPU bfloat16 autocast, ``model``'s Llama-code MLPs run their activation on the native kernel.

    An instance ``forward`` set for the block and removed after; an MLP that already has one (another
    library's hook) is left alone. Entered outside CPU bf16 autocast, nothing is installed.

    Example: the module docstring.
    """
    if not _half_autocast() or model in _ACTIVE:
        yield
        return
    installed: list[torch.nn.Module] = []
    _ACTIVE.add(model)
    try:
        for module in model.modules():
            if _is_llama_mlp(module) and "forward" not in vars(module):
                module.forward = types.MethodType(_forward, module)
                installed.append(module)
        yield
    finally:
        _ACTIVE.discard(model)
        for module in installed:
            del module.forward


def swiglu_on_recompute(context_fn: Callable[[], tuple[Any, Any]], model: torch.nn.Module) -> Callable[[], tuple[Any, Any]]:
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) that adds to ``context_fn``'s recompute context
    :func:`swiglu_mlps` where the layer's forward ran inside it (the recompute runs in the backward pass, outside it).

    Example:
        >>> plain = (contextlib.nullcontext(), contextlib.nullcontext())
        >>> swiglu_on_recompute(lambda: plain, torch.nn.Linear(2, 2))() is plain  # outside swiglu_mlps: unchanged
        True
    """

    def wrapped() -> tuple[Any, Any]:
        contexts = context_fn()
        if model not in _ACTIVE:
            return contexts
        forward, recompute = contexts

        @contextlib.contextmanager
        def both() -> Iterator[None]:
            with recompute, swiglu_mlps(model):  # checkpoint enters this inside the forward's autocast state
                yield

        return forward, both()

    return wrapped
