"""Decode-step attention for grouped-query models without copying the KV cache.

transformers' ``sdpa`` attention expands the key/value heads to one per query head
(``repeat_kv``) whenever an attention mask is given on a CPU or CUDA device: a copy of the
whole cache, per layer, at every decode step. Batched generation always has a mask (left
padding), so on SmolLM2 (9 query heads over 3 KV heads) that copy was 20% of float32
decode time (torch.profiler, 16 rows x 32 steps, 1 thread: ``aten::copy_`` of
``[16, 3, 3, 288, 64]``, 1.5 s of 7.7 s). ``enable_gqa=True`` avoids the copy, but in
bfloat16 torch's CPU flash-attention kernel with one query row per head is slow
(10.5 ms vs 1.9 ms per call for the grouped form below, same shapes, same machine).

With one query token per row, the query heads that share a KV head can instead be laid
out as that KV head's query *rows*: ``[batch, kv_heads, groups, head_dim]``. Scaled
dot-product attention then computes exactly the same sums (each query row attends over
its KV head; the mask ``[batch, 1, 1, keys]`` broadcasts over the rows), without the copy
and with ``groups`` rows per kernel call. A short run of query tokens (a reference scored
as the continuation of its cached prompt) is laid out the same way, ``groups x tokens``
rows per KV head, with the mask repeated per group: on SmolLM2's bench rows the
``repeat_kv`` copies there took 73 ms a layer against 9 ms of attention.

Each call also reads only the key columns its rows can see (:func:`key_spans`): prompts
are left padded and a static cache keeps empty room for the new tokens, so at a decode
step a short prompt's keys are a few columns at the right of a wide cache.

A bfloat16 decode step on a CPU with AVX512-BF16 goes to srdata's own kernel
(:mod:`srdata.backends.native`), 3-4x faster than the flash kernel per layer.

Everything else (long prefills, models without grouped heads, position biases, dropout)
goes to transformers' own ``sdpa`` function.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from srdata.backends.native import decode_attention

log = logging.getLogger(__name__)

NAME = "srdata_grouped_sdpa"


def grouped_decode_sdpa(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, with grouped-query heads attended without ``repeat_kv``.

    Decode steps (one query token) and short masked query runs (a reference scored as the
    continuation of a cached prompt) put the query heads of one KV head, times the query
    tokens, as that KV head's query rows; each run of similar rows reads only the key
    columns it can see (:func:`key_spans`).

    Example:
        >>> use_grouped_decode_attention(model)  # doctest: +SKIP
        True
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if q_len == 1:
        plain_mask = attention_mask is None or (attention_mask.ndim == 4 and attention_mask.shape[1:3] == (1, 1))
    else:  # the mask is repeated per query head: worth it while smaller than the repeated keys and values
        plain_mask = (
            attention_mask is not None and attention_mask.ndim == 4 and attention_mask.shape[:3] == (batch, 1, q_len)
            and groups * q_len * attention_mask.element_size() < 2 * heads * dim * key.element_size()
        )
    extras = (kwargs.get("position_bias") is not None or kwargs.get("cache") is not None or kwargs.get("dropout", 0.0)
              or kwargs.get("s_aux") is not None or kwargs.get("softcap"))
    if (groups <= 1 and q_len > 1) or not plain_mask or extras or kv_heads * groups != heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Query head h uses KV head h // groups (repeat_kv's order), so this view groups them.
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)
    if q_len == 1:  # bfloat16 on AVX512-BF16 CPUs: srdata's kernel, which skips the columns a row cannot see itself
        out = decode_attention(grouped, key, value, attention_mask, kwargs.get("scaling") or dim**-0.5)
        if out is not None:
            return out.reshape(batch, 1, heads, dim), None
        if groups <= 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = []
    for a, b, start, end in key_spans(attention_mask, batch, keys):
        mask = None if attention_mask is None else attention_mask[a:b, :, :, start:end]
        if mask is not None and q_len > 1:  # row g * q_len + t of a KV head is query head g's token t
            mask = mask[:, :, None].expand(b - a, 1, groups, q_len, end - start).reshape(b - a, 1, groups * q_len, end - start)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            grouped[a:b], key[a:b, :, start:end], value[a:b, :, start:end], attn_mask=mask, scale=kwargs.get("scaling"),
        ))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def key_spans(mask: torch.Tensor | None, rows: int, keys: int, slack_tokens: int = 32) -> list[tuple[int, int, int, int]]:
    """Runs of rows ``[a, b)`` and the key columns ``[start, end)`` that hold all their unmasked keys.

    A static cache is as long as the longest prompt plus every new token, and prompts are
    left padded: at a decode step a short prompt's keys are the last few columns and the
    columns right of the current step are still empty. Attention over only the columns a
    row can see computes the same sums (the rest are masked) and reads less of the cache,
    which is what a decode step's attention time is spent on. Rows are batched longest
    first, so neighbouring rows have similar spans; a run grows while its padded columns
    stay small (``rows * width <= 1.25 * columns + slack_tokens``). Computed from the mask at
    every call (~60 us for 64 rows; a cache keyed by the mask object could go stale).

    Example:
        >>> m = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)[:, None, None]
        >>> key_spans(m, 2, 5)
        [(0, 2, 0, 4)]
    """
    if mask is None or mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[0] != rows or mask.shape[-1] != keys:
        return [(0, rows, 0, keys)]
    visible = mask.reshape(rows, -1, keys).any(1)
    seen = visible.any(0).nonzero()
    end = int(seen.max()) + 1 if len(seen) else keys
    starts = visible.to(torch.int8).argmax(1).tolist()  # first visible column of each row
    spans: list[tuple[int, int, int, int]] = []
    a, start, columns = 0, starts[0], end - starts[0]
    for row in range(1, rows):
        wider = min(start, starts[row])
        if (row - a + 1) * (end - wider) <= 1.25 * (columns + end - starts[row]) + slack_tokens:
            start, columns = wider, columns + end - starts[row]
        else:
            spans.append((a, row, start, end))
            a, start, columns = row, starts[row], end - starts[row]
    spans.append((a, rows, start, end))
    return spans


def use_grouped_decode_attention(model: Any) -> bool:
    """Switch a model that uses transformers' ``sdpa`` attention to :func:`grouped_decode_sdpa`.

    Models on other attention functions (eager, flash, custom) are left as they are.
    Returns whether the model now uses it.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == NAME:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    try:  # transformers releases without these interfaces keep their own sdpa
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, grouped_decode_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as sdpa
        model.set_attn_implementation(NAME)
    except (ImportError, AttributeError, ValueError) as err:
        log.info("grouped decode attention unavailable (%s); using transformers' sdpa", err)
        return False
    return model.config._attn_implementation == NAME
