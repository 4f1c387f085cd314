"""RMSNorm with a hand-written backward pass (in torch ops, or a native kernel), for bfloat16 training on CPUs.

Under CPU half autocast the student's residual stream stays float32 (its embeddings are float32
master weights), so every RMSNorm runs in float32, and autograd differentiates its formula op by op:
``pow``, ``mean``, ``add``, ``rsqrt``, two ``mul`` forward, about twice as many passes back, each over
a (tokens, hidden) float32 tensor, 61 norms per SmolLM2 forward. :class:`RMSNormFunction` computes
the same forward, bit for bit, and its gradients in closed form (``dx = rstd * (g w - x̂ mean(g w x̂))``,
``dw = sum g x̂``): (4, 512, 576) forward + backward 5.3 -> 3.4 ms on 2 threads. Gradients differ
from autograd's by float32 rounding only. :func:`fast_rms_norms` installs it on a model's norms of the
Llama formula (the same code as transformers' ``LlamaRMSNorm.forward``) for the duration of a block;
:func:`srd_distill.cpu_attention.half_block_inputs` enters it under CPU half autocast only, so float32
runs never see it.

Where srdata's native kernels build (``srdata.backends.native``: AVX512-BF16, a C compiler, not
``SRDATA_NATIVE_KERNELS=0``) and the hidden size is a multiple of 16, ``kernels/rms_norm.c`` runs
them instead: :class:`NativeRMSNorm`, one pass per row forward (sum of squares, rstd, ``w x rstd``)
and one back (``dx`` and per-thread ``dw`` partials, summed after), gradients within float32
rounding of the float64 ones. A decoder layer's two norms (input, post-attention) emit their output
in bfloat16 directly: :func:`half_block_inputs` casts the block's input to bf16 at its entrance
anyway, so the matmuls get the same bf16 rounding of the same float32 product, and the q/k/v (gate/up) input
gradients were already summed in bf16 inside the block; the norm only saves the cast's passes.
(4, 512, 576) forward + backward including the bf16 cast, 2 threads, freed memory kept as in training
(shared machine, two runs): autograd 6.0-6.3 ms, closed form 3.0-3.8 ms, the kernel 1.4-2.1 ms with a
float32 output, 0.7-1.7 ms with the bf16 one; a bf16 SmolLM2 step 15.91 -> 15.67 s. The bf16 teacher's
norms (:func:`teacher_rms_norms`, no gradient) run in one pass that gives ``LlamaRMSNorm``'s
result (normed rounded to bf16, times the bf16 weight, rounded again) up to the order of the sum
of squares: 0.8-1.3 -> 0.15-0.18 ms on the same shape. Anywhere else (no kernel, other dtypes or sizes,
GPUs) the torch paths run, with no error.

Example:
    >>> import torch
    >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
    >>> norm, x = LlamaRMSNorm(4), torch.randn(2, 4)
    >>> torch.equal(RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon), norm(x))
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import types
from typing import Any, Iterator

import torch

__all__ = ["NativeRMSNorm", "RMSNormFunction", "fast_rms_norms", "native_kernel", "teacher_rms_norms"]

#: Largest error of the load check, relative to the largest value (bf16 outputs: up to ~4e-3; float32 ones ~1e-6).
CHECK_TOLERANCE = 1e-2


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` as ``LlamaRMSNorm`` computes it for a float32 ``x``."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            normed = x * rstd
            out = weight * normed
        ctx.save_for_backward(normed, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        normed, rstd, weight = ctx.saved_tensors
        grad = grad.to(normed.dtype)
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (grad * normed).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        d_x = None
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            dot = (scaled * normed).mean(-1, keepdim=True)
            d_x = scaled.addcmul_(normed, dot, value=-1.0).mul_(rstd)
        return d_x, d_weight, None


class NativeRMSNorm(torch.autograd.Function):
    """:class:`RMSNormFunction` in srdata's native kernel (``kernels/rms_norm.c``): one pass forward, one back.

    ``bf16_out``: the output rounded to bfloat16 (as autocast's cast would), its gradient read in bfloat16.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, bf16_out):  # type: ignore[override]
        x, weight = x.contiguous(), weight.contiguous()
        out, rstd = _launch(native_kernel(), 1 if bf16_out else 0, x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        if grad.dtype not in (torch.float32, torch.bfloat16):
            grad = grad.float()
        op = 3 if grad.dtype == torch.bfloat16 else 2
        d_x, partial = _launch(native_kernel(), op, x, weight, 0.0, grad=grad.contiguous(), rstd=rstd)
        d_weight = partial.sum(0) if ctx.needs_input_grad[1] else None
        return (d_x if ctx.needs_input_grad[0] else None), d_weight, None, None


@functools.lru_cache(maxsize=1)
def native_kernel() -> Any | None:
    """The checked native RMSNorm kernel, or ``None`` (logged once) where it cannot be used (then torch's ops run)."""
    from srdata.backends import native

    argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    return native.load(native.KERNELS / "rms_norm.c", "srdata_rms_norm", argtypes, rms_norm_check_error, CHECK_TOLERANCE, "RMSNorm")


def _launch(kernel: Any, op: int, x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor | None = None,
            rstd: torch.Tensor | None = None, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel call (ops in ``kernels/rms_norm.c``) on contiguous tensors: (out, rstd) forward, (dx, partial dw) back."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    threads = threads or torch.get_num_threads()
    out = torch.empty(x.shape, dtype=torch.bfloat16 if op in (1, 4) else torch.float32)
    partial = torch.zeros(threads if op in (2, 3) else 0, hidden)
    if rstd is None:
        rstd = torch.empty(x.shape[:-1] if op in (0, 1) else (0,))
    status = kernel(op, x.data_ptr(), weight.data_ptr(), grad.data_ptr() if grad is not None else None, out.data_ptr(),
                    rstd.data_ptr(), partial.data_ptr(), rows, hidden, float(eps), threads)
    if status != 0:
        raise RuntimeError(f"srdata's RMSNorm kernel declined (status {status}, hidden size {hidden})")
    return out, (rstd if op in (0, 1) else partial)


def rms_norm_check_error(kernel: Any) -> float:
    """The kernel's largest error over its five ops against float64 on random rows, relative to the largest value.

    A bfloat16 output is within half a bf16 ulp of the float64 value (so up to ~4e-3 relative).
    """
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for rows, hidden, threads in ((7, 48, 2), (3, 16, 1)):
        x = torch.randn(rows, hidden, generator=generator) * 3
        weight, grad = torch.randn(hidden, generator=generator), torch.randn(rows, hidden, generator=generator)
        xd, wd = x.double(), weight.double()
        rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
        outs = [(_launch(kernel, op, x, weight, 1e-5, threads=threads)[0], wd * xd * rstd) for op in (0, 1)]
        saved = _launch(kernel, 0, x, weight, 1e-5, threads=threads)[1]
        for op, g in ((2, grad), (3, grad.bfloat16())):
            got_x, got_w = _launch(kernel, op, x, weight, 0.0, grad=g, rstd=saved, threads=threads)
            gw, xhat = g.double() * wd, xd * rstd
            outs += [(got_x, rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))), (got_w.sum(0), (g.double() * xhat).sum(0))]
        xb, wb = x.bfloat16().double(), weight.bfloat16()
        exact = wb.double() * xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-5)
        outs.append((_launch(kernel, 4, x.bfloat16(), wb, 1e-5, threads=threads)[0], exact))
        for got, want in outs:
            worst = max(worst, float((got.double() - want).abs().max() / want.abs().max()))
    return worst


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """A norm whose forward is transformers' ``LlamaRMSNorm.forward`` (the same code: Qwen2, Mistral, ... copy it)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward = getattr(type(module), "forward", None)
    code, llama = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    same = code is not None and (code.co_code, code.co_consts, code.co_names) == (llama.co_code, llama.co_consts, llama.co_names)
    weight = getattr(module, "weight", None)
    return same and isinstance(weight, torch.Tensor) and isinstance(getattr(module, "variance_epsilon", None), float)


def _forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _norm(self, hidden_states, to_block=False)


def _forward_to_block(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _norm(self, hidden_states, to_block=True)


def _norm(self: torch.nn.Module, hidden_states: torch.Tensor, to_block: bool) -> torch.Tensor:
    """The native kernel where it applies, else :class:`RMSNormFunction` (float32), else the model's own code."""
    weight, eps = self.weight, self.variance_epsilon
    kernel = _kernel_for(hidden_states, weight)
    if hidden_states.dtype == torch.float32 and weight.dtype == torch.float32:
        if kernel is not None:
            # A norm whose output a hooked block casts to bf16 anyway emits it in bf16 (see the module docstring).
            bf16_out = to_block and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            return NativeRMSNorm.apply(hidden_states, weight, eps, bf16_out)
        return RMSNormFunction.apply(hidden_states, weight, eps)
    grad = torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)
    if kernel is not None and hidden_states.dtype == weight.dtype == torch.bfloat16 and not grad:
        return _launch(kernel, 4, hidden_states.contiguous(), weight.contiguous(), eps)[0]  # the bf16 teacher
    return type(self).forward(self, hidden_states)  # the model's own code


def _kernel_for(x: torch.Tensor, weight: torch.Tensor) -> Any | None:
    """The native kernel if it can take ``x`` (a CPU tensor with a hidden size that is a multiple of 16), else None."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() < 1 or x.shape[-1] % 16 or x.shape[-1] == 0:
        return None
    if weight.shape != x.shape[-1:]:
        return None
    return native_kernel()


def _feeds_block(model: torch.nn.Module) -> set[int]:
    """ids of the norms of Llama decoder layers (transformers' code) whose output only a hooked block reads."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    llama = inspect.unwrap(LlamaDecoderLayer.forward).__code__
    # The blocks srd_distill.cpu_attention.half_block_inputs hooks (q/k/v and gate/up/down linears); its test
    # that a decoder layer's norm emits bf16 (tests/test_cpu_norm.py) fails if the two lists part.
    linears = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
    found: set[int] = set()
    for layer in model.modules():  # the layer's code, not a decorator's wrapper (OLMo2's post-norms must not qualify)
        code = getattr(inspect.unwrap(getattr(type(layer), "forward", None) or (lambda: None)), "__code__", None)
        if code is None or (code.co_code, code.co_names) != (llama.co_code, llama.co_names):
            continue
        for norm, block in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
            hooked = all(isinstance(getattr(getattr(layer, block, None), n, None), torch.nn.Linear) for n in linears[block])
            if hooked and getattr(layer, norm, None) is not None:
                found.add(id(getattr(layer, norm)))
    return found


@contextlib.contextmanager
def fast_rms_norms(model: torch.nn.Module, bf16_to_blocks: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s Llama-formula RMSNorms run srdata's native kernel (:class:`NativeRMSNorm` on
    float32 inputs, one inference pass on bfloat16 ones without gradients) where it applies, else
    :class:`RMSNormFunction` on float32 inputs, else the model's own code.

    ``bf16_to_blocks``: a Llama decoder layer's two norms emit bfloat16 under CPU bf16 autocast
    (the attention and MLP that read them take bf16 inputs, :func:`half_block_inputs`). An instance ``forward`` set for the block and removed after; a norm that already has one
    (another library's hook) is left alone.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> norm = LlamaRMSNorm(4)
        >>> with fast_rms_norms(norm):
        ...     "forward" in vars(norm)
        True
        >>> "forward" in vars(norm)
        False
    """
    installed: list[Any] = []
    to_block = _feeds_block(model) if bf16_to_blocks else set()
    try:
        for module in model.modules():
            if _is_llama_rms_norm(module) and "forward" not in vars(module):
                module.forward = types.MethodType(_forward_to_block if id(module) in to_block else _forward, module)
                installed.append(module)
        yield
    finally:
        for module in installed:
            del module.forward


@contextlib.contextmanager
def teacher_rms_norms(model: torch.nn.Module) -> Iterator[None]:
    """:func:`fast_rms_norms` for a model run without gradients (the teacher), within CPU half autocast only.

    A bfloat16 teacher's norms then run in one native pass each (the result of ``LlamaRMSNorm``
    in bf16 up to the order of the sum of squares); outside CPU half autocast nothing changes.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> norm = LlamaRMSNorm(4)
        >>> with teacher_rms_norms(norm):  # no autocast: untouched
        ...     "forward" in vars(norm)
        False
    """
    half = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
    if not half:  # as srd_distill.cpu_attention.half_block_inputs decides
        yield
        return
    with fast_rms_norms(model, bf16_to_blocks=False):  # its blocks are not hooked: outputs in their own dtype
        yield
