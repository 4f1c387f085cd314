"""Attention for bfloat16 training on CPUs: two grouped batched matmuls instead of SDPA's CPU flash kernel.

On a CPU without AMX, PyTorch's SDPA flash kernel runs bfloat16 no faster than float32
(SmolLM2's attention, 4 x 512 tokens, one core: forward 34 ms, backward 80-89 ms per
layer in both dtypes), about a quarter of a bfloat16 srd-distill step, while oneDNN's
bfloat16 batched matmuls run at 2x the float32 ones. :func:`grouped_attention` computes
``softmax(q k^T * scale + mask) v`` with batched matmuls in the compute dtype, the query heads
of a key/value group stacked so keys and values are never repeated, the mask an additive bias
of the score matmul, and the queries in causal blocks that skip the keys after them. It is what ``sdpa`` means inside :func:`half_attention` (entered by
``srd_distill.memory.autocast_context`` on a CPU in bfloat16/float16 only); the float32
path and GPUs keep SDPA. Anything it does not handle (a cache, one query token, dropout
in training, soft-capping, sinks, a float mask) goes to SDPA unchanged.

Example:
    >>> import torch
    >>> q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    >>> ours = grouped_attention(torch.nn.Module(), q, k, v, None)[0]
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    >>> torch.allclose(ours, ref.transpose(1, 2), atol=1e-5)
    True
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["grouped_attention", "half_attention", "half_block_inputs", "same_on_recompute"]

# Keyword arguments that change what attention computes: such calls go to SDPA.
#: Query blocks of :func:`grouped_attention` (causal: each skips the keys after it).
QUERY_BLOCKS = 4

_UNHANDLED = ("softcap", "s_aux", "sinks", "sliding_window", "position_bias", "cache")


def _handled(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor],
             dropout: float, is_causal: Optional[bool], kwargs: dict[str, Any]) -> bool:
    batch, heads, length, _ = query.shape
    if query.device.type != "cpu" or key.shape[2] != length or length < 2 or heads % key.shape[1]:
        return False
    if (dropout and module.training) or kwargs.get("output_attentions") or any(kwargs.get(k) is not None for k in _UNHANDLED):
        return False
    if is_causal is False or not getattr(module, "is_causal", True):
        return False
    return mask is None or (mask.dtype == torch.bool and tuple(mask.shape) == (batch, 1, length, length))


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal self-attention as ``transformers``' ``sdpa`` computes it, with batched matmuls in the autocast dtype.

    ``query`` ``(batch, heads, length, dim)``, ``key``/``value`` ``(batch, kv_heads, length, dim)``,
    ``attention_mask`` the boolean ``(batch, 1, length, length)`` mask of ``sdpa`` (True: attend)
    or None (causal). Returns ``(batch, length, heads, dim)`` and no weights, as the ``sdpa``
    attention function. Masked scores get half the dtype's lowest value added, not -inf, so a row
    with no key left (left padding) is finite, never NaN. Example: the module docstring.
    """
    if not _handled(module, query, key, attention_mask, dropout, is_causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    scale = scaling if scaling is not None else dim**-0.5
    with torch.autocast("cpu", enabled=False):  # dtypes chosen here
        # Query head h uses key/value head h // group (transformers' repeat_kv): stack each group's queries.
        q = query.to(dtype).reshape(batch * kv_heads, group, length, dim)
        k = key.to(dtype).reshape(batch * kv_heads, length, dim)
        v = value.to(dtype).reshape(batch * kv_heads, length, dim)
        blocks, biases = _block_biases(attention_mask, (batch, kv_heads, group, length), dtype, query.device)
        out = _BlockedAttention.apply(q, k, v, blocks, biases, scale, (batch, kv_heads, group, length, dim))
    return out.view(batch, length, heads, dim), None


class _BlockedAttention(torch.autograd.Function):
    """``softmax(scale * q k^T + bias) v`` one causal query block at a time, with its own backward pass.

    Autograd through the blocks would slice ``q``, ``k`` and ``v`` per block and, in the backward pass,
    pad each block's gradient to the full length with zeros and add the blocks up (per layer: 12
    zero-padded copies and 9 adds of (batch, heads, length, dim) tensors), and scale the query and key
    gradients in separate passes. Here the key and value gradients accumulate in place (``baddbmm_``
    into their rows ``[0, stop)``), the query gradient of a block is written where it belongs, and the
    scale is the matmuls' alpha. The output is written straight in ``(batch, length, heads, dim)``
    order (no transposed copy after). Values are the same operations as before; gradients differ by
    bfloat16 rounding only (fewer roundings: no separate scaling pass). In bfloat16 the softmax and its backward run
    on srdata's native kernel where it builds (:mod:`srd_distill.native_softmax`; within one bf16 ulp of torch's).
    """

    @staticmethod
    def forward(ctx, q, k, v, blocks, biases, scale, shape):  # type: ignore[override]
        batch, kv_heads, group, length, dim = shape
        bkv = batch * kv_heads
        out = torch.empty(batch, length, kv_heads, group, dim, dtype=q.dtype, device=q.device)
        saved = []
        for (start, stop), bias in zip(blocks, biases):
            # Causal: this block's queries attend to keys [0, stop) only; the scores beyond are never computed
            # (a quarter of the work at 4 blocks would be masked-out scores and their softmax).
            rows = stop - start
            q_block = q[:, :, start:stop].reshape(bkv, group * rows, dim)
            probs = _softmax(torch.baddbmm(bias, q_block, k[:, :stop].transpose(1, 2), alpha=scale))
            block_out = torch.bmm(probs, v[:, :stop]).view(batch, kv_heads, group, rows, dim)
            out[:, start:stop] = block_out.permute(0, 3, 1, 2, 4)
            saved += [q_block, probs]
        ctx.save_for_backward(k, v, *saved)  # through save_for_backward: checkpointing's hooks see them
        ctx.blocks, ctx.scale, ctx.shape = blocks, scale, shape
        return out.view(batch, length, kv_heads * group, dim)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        k, v, *saved = ctx.saved_tensors
        batch, kv_heads, group, length, dim = ctx.shape
        bkv = batch * kv_heads
        grad_out = grad_out.view(batch, length, kv_heads, group, dim)
        dq = torch.empty(bkv, group, length, dim, dtype=k.dtype, device=k.device)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for i, (start, stop) in enumerate(ctx.blocks):
            rows = stop - start
            q_block, probs = saved[2 * i], saved[2 * i + 1]
            d_out = grad_out[:, start:stop].permute(0, 2, 3, 1, 4).reshape(bkv, group * rows, dim)
            dv[:, :stop].baddbmm_(probs.transpose(1, 2), d_out)
            d_scores = _softmax_backward(torch.bmm(d_out, v[:, :stop].transpose(1, 2)), probs)
            d_q = torch.baddbmm(d_out.new_empty(()), d_scores, k[:, :stop], beta=0, alpha=ctx.scale)
            dq[:, :, start:stop] = d_q.view(bkv, group, rows, dim)
            dk[:, :stop].baddbmm_(d_scores.transpose(1, 2), q_block, alpha=ctx.scale)
        return dq, dk, dv, None, None, None, None


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; bfloat16 CPU scores on srdata's native kernel, in place (the scores are this
    block's own temporary), within one bf16 ulp of torch's (``srd_distill.native_softmax``), else torch's."""
    from srd_distill.native_softmax import softmax_bf16

    probs = softmax_bf16(scores, out=scores) if scores.dtype == torch.bfloat16 else None
    return probs if probs is not None else torch.softmax(scores, dim=-1)


def _softmax_backward(d_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The scores' gradient ``probs * (d_probs - sum(d_probs * probs))``: the native kernel for bfloat16 (over
    ``d_probs``, a temporary), else torch's."""
    from srd_distill.native_softmax import softmax_backward_bf16

    d_scores = softmax_backward_bf16(d_probs, probs, out=d_probs) if probs.dtype == torch.bfloat16 else None
    return d_scores if d_scores is not None else torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)


#: The last mask's query blocks and per-block biases: every layer of a forward pass gets the same mask object.
_LAST_BIASES: list[Any] = []


def _block_biases(attention_mask: Optional[torch.Tensor], shape: tuple[int, int, int, int], dtype: torch.dtype,
                  device: torch.device) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """The query blocks of :func:`_query_blocks` and, per block, the mask as the ``(batch * kv_heads, group * rows, stop)``
    additive bias its score matmul adds; built once per mask and reused while the same, unchanged mask comes back
    (the layers of one forward pass: transformers builds one mask per pass and hands it to every layer).

    Masked scores get half the dtype's lowest value (see :func:`_masked_bias`).
    """
    batch, kv_heads, group, length = shape
    key = (shape, dtype, device, _mask_state(attention_mask))
    if _LAST_BIASES and _LAST_BIASES[0] == key and (attention_mask is None or _LAST_BIASES[1]() is attention_mask):
        return _LAST_BIASES[2], _LAST_BIASES[3]
    if attention_mask is None:
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None, None]
    else:
        allowed = attention_mask[:, :, None]  # (batch, 1, 1, length, length)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, _masked_bias(dtype))
    blocks = _query_blocks(allowed, length)
    biases = [bias[..., start:stop, :stop].expand(batch, kv_heads, group, stop - start, stop)
              .reshape(batch * kv_heads, group * (stop - start), stop) for start, stop in blocks]
    _LAST_BIASES[:] = [key, weakref.ref(attention_mask) if attention_mask is not None else None, blocks, biases]
    return blocks, biases


def _mask_state(mask: Optional[torch.Tensor]) -> Optional[tuple]:
    """What must not have changed for a mask's biases to be reused: storage, layout and (where tracked) its version."""
    if mask is None:
        return None
    version = None if mask.is_inference() else mask._version  # inference tensors keep no version counter
    return (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype, version)


def _query_blocks(allowed: torch.Tensor, length: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the query blocks: ``QUERY_BLOCKS`` near-equal ones when no query of a block may attend to a key
    after the block (a causal mask, as transformers builds for these models), else one block of all queries.

    Four blocks skip 3/8 of the score matrix; SmolLM2's attention at 4 x 512 tokens, 2 threads: forward
    30 -> 10 ms, backward 20-25 -> 15-18 ms per layer, against one block.
    """
    edges = sorted({length * i // QUERY_BLOCKS for i in range(QUERY_BLOCKS + 1)})
    blocks = list(zip(edges, edges[1:]))
    if len(blocks) > 1 and any(bool(allowed[..., start:stop, stop:].any()) for start, stop in blocks[:-1]):
        return [(0, length)]  # a query sees a later key: not causal, no block may be cut
    return blocks


def _masked_bias(dtype: torch.dtype) -> float:
    """What masked scores get added: half the dtype's lowest value, so that adding a score never overflows to -inf
    (a row with no key left, as left padding makes, stays finite, never NaN) while ``exp`` of it is exactly 0."""
    return torch.finfo(dtype).min / 2


@contextlib.contextmanager
def half_attention() -> Iterator[None]:
    """Within the block, models that use ``sdpa`` attention call :func:`grouped_attention` instead.

    The override lives in ``transformers``' attention registry (a local entry of its shared
    ``ALL_ATTENTION_FUNCTIONS``, restored on exit); models' configs are not touched, so a
    checkpoint saved afterwards still says ``sdpa``.

    Example:
        >>> from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        >>> with half_attention():
        ...     ALL_ATTENTION_FUNCTIONS["sdpa"] is grouped_attention
        True
        >>> ALL_ATTENTION_FUNCTIONS["sdpa"] is grouped_attention
        False
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, previous = "sdpa" in local, local.get("sdpa")
    local["sdpa"] = grouped_attention
    try:
        yield
    finally:
        if had:
            local["sdpa"] = previous
        else:
            local.pop("sdpa", None)


def _half_dtype() -> Optional[torch.dtype]:
    """The CPU autocast dtype when CPU autocast is on in bfloat16/float16, else None."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _cast_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    """Forward pre-hook: the block's float32 hidden states (and an attention's rotary cos/sin) in the autocast dtype."""
    dtype = _half_dtype()
    if dtype is None:
        return None

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu":
            return x.to(dtype)
        if isinstance(x, tuple) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):  # (cos, sin)
            return tuple(cast(t) for t in x)
        return x

    args = tuple(cast(a) if i == 0 else a for i, a in enumerate(args))
    kwargs = {k: cast(v) if k in ("hidden_states", "x", "position_embeddings") else v for k, v in kwargs.items()}
    return args, kwargs


def _llama_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention blocks with q/k/v projections and gated MLPs with gate/up projections (the Llama family's layout)."""
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))
            or all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))]


@contextlib.contextmanager
def half_block_inputs(model: torch.nn.Module) -> Iterator[None]:
    """Within CPU half autocast, ``model``'s attention and MLP blocks take their inputs in the autocast dtype.

    Autocast casts a float32 input once per linear layer that reads it: the normed hidden
    states three times per attention block (q, k, v) and twice per MLP (gate, up), and their
    gradients back as often. Cast once at the block's entrance instead (the same bfloat16
    values reach the matmuls). The rotary cos/sin go in the autocast dtype too, so the
    rotation runs in it rather than promoting q and k to float32 for attention to cast back.
    Outside CPU half autocast (float32 runs, GPUs) the hooks change nothing; entered outside
    it, nothing is even registered.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                      num_attention_heads=2, num_key_value_heads=1))
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), half_block_inputs(model):
        ...     len(model.model.layers[0].self_attn._forward_pre_hooks)
        1
    """
    if _half_dtype() is None:
        yield
        return
    from srd_distill.cpu_norm import fast_rms_norms

    handles = [m.register_forward_pre_hook(_cast_inputs, with_kwargs=True) for m in _llama_blocks(model)]
    _HOOKED.add(model)
    try:
        with fast_rms_norms(model):  # the float32 norms' backward in closed form (srd_distill.cpu_norm)
            yield
    finally:
        _HOOKED.discard(model)
        for handle in handles:
            handle.remove()


_HOOKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models inside half_block_inputs now


def same_on_recompute(model: torch.nn.Module) -> Callable[[], tuple[Any, Any]]:
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): a layer recomputed in the backward pass runs with
    the bfloat16 attention and block input casts that its forward ran with.

    Both are entered around the forward only (the backward runs outside), so without this a
    recomputed layer would take SDPA and per-linear casts and save other tensors than its
    forward did (``CheckpointError``). Where neither was on (float32, GPUs), both contexts are
    empty, as PyTorch's default.

    Example:
        >>> same_on_recompute(torch.nn.Linear(2, 2))()
        (nullcontext(), nullcontext())
    """

    def context_fn() -> tuple[Any, Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa") is grouped_attention
        hooked = model in _HOOKED
        if not attention and not hooked:
            return contextlib.nullcontext(), contextlib.nullcontext()
        stack = contextlib.ExitStack()

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            with stack:
                if attention:
                    stack.enter_context(half_attention())
                if hooked:
                    stack.enter_context(half_block_inputs(model))
                yield

        return contextlib.nullcontext(), recompute()

    return context_fn
