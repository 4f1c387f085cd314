"""srd-distill's bfloat16 step on a CPU (issue 28): the grouped attention's own backward pass and mask biases, the norms' closed-form backward.

The attention's query blocks used to go through autograd block by block: the backward pass padded
each block's query/key/value gradient to the full length with zeros and added the blocks up, and
scaled the query and key gradients in separate passes; every layer rebuilt the mask's bias. Values
and gradients must still equal SDPA in float64; a changed mask must never reuse a stale bias.
"""

from __future__ import annotations

import pytest
import torch

from srd_distill.cpu_attention import grouped_attention
from tests.test_distill_bf16 import sdpa_reference
from tests.test_distill_bf16_step import OpLog


def _inputs(dtype, batch=2, heads=6, kv_heads=2, length=16, dim=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    # As transformers hands them over: (batch, heads, length, dim) views of (batch, length, heads, dim) projections.
    return tuple(torch.randn(batch, length, h, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
                 for h in (heads, kv_heads, kv_heads))


def _causal_mask(batch, length, pad_right=0):
    real = torch.ones(batch, length, dtype=torch.bool)
    if pad_right:
        real[1, length - pad_right:] = False
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]


def test_backward_adds_no_zero_padded_block_gradients_and_no_separate_scaling():
    q, k, v = _inputs(torch.bfloat16)
    mask = _causal_mask(2, 16, pad_right=3)
    out = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
    with OpLog() as log:
        out.float().sum().backward()
    names = [name for name, _, _ in log.calls]
    # Autograd through the 4 blocks: 12 slice_backward (zero-padded copies), adds of the block gradients, and a
    # mul per block for the scale on the query and key gradients.
    assert "slice_backward" not in names
    assert not [n for n in names if n in ("add", "add_", "mul", "mul_")], names
    # dk, dv in place; per block torch's softmax backward, or none where srdata's native bf16 softmax runs it.
    from srd_distill.native_softmax import softmax_kernel

    assert names.count("baddbmm_") == 8 and names.count("_softmax_backward_data") == (0 if softmax_kernel() else 4)


@pytest.mark.parametrize("padding", [0, 3])
def test_blocked_attention_equals_sdpa_in_float64_with_transposed_inputs(padding):
    q, k, v = _inputs(torch.float64)
    mask = _causal_mask(2, 16, padding) if padding else None
    ours = grouped_attention(torch.nn.Module(), q, k, v, mask, scaling=0.3)[0]
    reference_mask = mask if mask is not None else None
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if reference_mask is None:
        ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=0.3).transpose(1, 2)
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=reference_mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_mask_bias_built_once_for_the_layers_of_a_pass_and_rebuilt_when_the_mask_changes():
    q, k, v = _inputs(torch.float64)
    mask = _causal_mask(2, 16, pad_right=3)
    with OpLog() as log:
        first = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
        second = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]  # the next layer: same mask object
    assert [name for name, _, _ in log.calls].count("masked_fill_") == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # The same mask object changed in place (its version moves): the bias must follow, never a stale one.
    mask[0, :, :, 10:] = False
    with OpLog() as log:
        changed = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
    assert [name for name, _, _ in log.calls].count("masked_fill_") == 1
    keep = mask[:, 0].any(-1)  # rows with a key left (SDPA gives NaN for the others)
    torch.testing.assert_close(changed[keep], sdpa_reference(q, k, v, mask)[keep], rtol=1e-10, atol=1e-12)
    # A new mask object with equal shape (what the next forward pass builds): its own bias.
    other = _causal_mask(2, 16, pad_right=7)
    out = grouped_attention(torch.nn.Module(), q, k, v, other)[0]
    keep = other[:, 0].any(-1)
    torch.testing.assert_close(out[keep], sdpa_reference(q, k, v, other)[keep], rtol=1e-10, atol=1e-12)
    # No mask (causal): its own bias too.
    torch.testing.assert_close(grouped_attention(torch.nn.Module(), q, k, v, None)[0], sdpa_reference(q, k, v, None),
                               rtol=1e-10, atol=1e-12)


def test_inference_mode_masks_are_reused_only_while_the_same_object():
    q, k, v = (t.detach() for t in _inputs(torch.bfloat16))
    with torch.inference_mode():
        mask = _causal_mask(2, 16, pad_right=2)
        a = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
        del mask
        other = _causal_mask(2, 16, pad_right=9)  # may land at the freed mask's address
        b = grouped_attention(torch.nn.Module(), q, k, v, other)[0]
    expected = grouped_attention(torch.nn.Module(), q, k, v, _causal_mask(2, 16, pad_right=9))[0]
    torch.testing.assert_close(b, expected, rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_rms_norm_function_equals_llama_rms_norm_forward_and_autograd_gradients():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from srd_distill.cpu_norm import RMSNormFunction

    g = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(24, eps=1e-5)  # float32, as under CPU half autocast (LlamaRMSNorm computes in float32 anyway)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    x = torch.randn(3, 7, 24, generator=g, requires_grad=True)
    grad = torch.randn(3, 7, 24, generator=g)
    expected = norm(x)
    ex, ew = torch.autograd.grad(expected, (x, norm.weight), grad)
    ours = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    ox, ow = torch.autograd.grad(ours, (x, norm.weight), grad)
    assert torch.equal(ours, expected)  # the same float32 ops forward: bit for bit
    torch.testing.assert_close(ox, ex, rtol=1e-5, atol=1e-6)  # closed form vs op by op: float32 rounding
    torch.testing.assert_close(ow, ew, rtol=1e-5, atol=1e-6)


def test_fast_rms_norms_serves_float32_norms_only_inside_the_block():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from srd_distill.cpu_norm import fast_rms_norms

    model = torch.nn.Sequential(LlamaRMSNorm(8), torch.nn.LayerNorm(8))
    x = torch.randn(2, 8, requires_grad=True)
    with fast_rms_norms(model):
        out = model[0](x)
        assert out.grad_fn is not None and "RMSNormFunction" in type(out.grad_fn).__name__
        assert "forward" not in vars(model[1])  # not a Llama-formula norm: untouched
        half = model[0](x.detach().to(torch.bfloat16).requires_grad_())  # a bfloat16 stream keeps the model's own code
        assert "RMSNormFunction" not in type(half.grad_fn).__name__
    assert "forward" not in vars(model[0])
