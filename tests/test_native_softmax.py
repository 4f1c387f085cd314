"""The bfloat16 attention softmax on srdata's native kernel (srd_distill/native_softmax.py, kernels/softmax_bf16.c).

Forward and backward against float64 and against torch's bf16 ops (rows with the attention mask's bias, row
lengths that are not a multiple of 16, 1 and 2 threads, non-finite rows), then ``grouped_attention``'s values
and gradients with and without the kernel. Bounds: the forward is softmax in float32 rounded once to bf16, so
each probability is within one bf16 ulp (2**-7 relative; half an ulp plus float32 error in practice) of float64's
and of torch's; the backward within one bf16 ulp of the row's largest gradient.
"""

from __future__ import annotations

import pytest
import torch

from srd_distill import native_softmax
from srd_distill.cpu_attention import _masked_bias, grouped_attention
from srdata.backends import native

REASON = native.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"srdata's native kernel cannot be built here: {REASON}")
ULP = 2.0**-7  # bf16's relative spacing at the top of a binade (8 significant bits)


def _scores(shape: tuple[int, ...], seed: int, masked: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    if masked:  # the bias the attention adds to masked keys, on top of the scores: a causal tail per row
        cols = shape[-1]
        x[..., 0, cols // 3:] += _masked_bias(torch.bfloat16)
        x[..., 1, 1:] += _masked_bias(torch.bfloat16)
    return x


def _launch(op: int, x: torch.Tensor, p: torch.Tensor | None, threads: int) -> torch.Tensor:
    out = native_softmax._launch(native_softmax.softmax_kernel(), op, x, p, None, threads)
    assert out is not None
    return out


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cols", [1, 9, 16, 37, 450])
def test_forward_within_one_ulp_of_float64_and_torch(cols, threads):
    x = _scores((3, 7, cols), seed=cols, masked=cols > 2)
    ours = _launch(0, x, None, threads)
    exact = torch.softmax(x.double(), -1)
    torch_bf16 = torch.softmax(x, -1)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    # Once rounded: half an ulp of float64's value (the float32 math's own error is far below).
    assert ((ours.double() - exact).abs() <= exact.abs() * ULP / 2 * 1.001 + 1e-40).all()
    assert ((ours.double() - torch_bf16.double()).abs() <= torch_bf16.double().abs() * ULP + 1e-40).all()
    assert (ours != torch_bf16).float().mean() < 0.01  # the same rounding almost everywhere
    if cols > 2:
        assert (ours[:, 0, cols // 3:] == 0).all() and (ours[:, 1, 1:] == 0).all() and (ours[:, 1, 0] == 1).all()


@needs_kernel
def test_forward_of_a_fully_masked_row_is_torchs_uniform_row_and_non_finite_rows_are_nan():
    x = _scores((2, 4, 20), seed=3, masked=False)
    x[0, 0] = _masked_bias(torch.bfloat16)  # left padding: no key left
    x[0, 1, 5] = float("nan")
    x[0, 2, 7] = float("inf")
    x[0, 3] = float("-inf")
    ours, want = native_softmax.softmax_bf16(x), torch.softmax(x, -1)
    assert torch.equal(ours[0, 0], want[0, 0]) and torch.isfinite(ours[0, 0]).all()
    assert ours[0, 1:].isnan().all() and want[0, 1:].isnan().all()  # never a finite row from a NaN/inf score
    torch.testing.assert_close(ours[1].float(), want[1].float(), rtol=ULP, atol=0)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cols", [5, 16, 33, 450])
def test_backward_matches_float64_and_torch(cols, threads):
    probs = torch.softmax(_scores((2, 6, cols), seed=cols, masked=cols > 2), -1)
    grad = torch.randn(probs.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ours = _launch(1, grad, probs, threads)
    p, g = probs.double(), grad.double()
    exact = p * (g - (g * p).sum(-1, keepdim=True))
    scale = exact.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    assert ((ours.double() - exact).abs() <= scale * ULP).all()
    theirs = torch._softmax_backward_data(grad, probs, -1, torch.bfloat16)
    assert ((ours.double() - theirs.double()).abs() <= scale * ULP).all()
    if cols > 2:
        assert (ours[:, 0, cols // 3:] == 0).all()  # masked keys: zero probability, zero gradient


@needs_kernel
def test_strided_inputs_and_in_place_outputs():
    base = _scores((4, 40, 30), seed=2)
    x = base.transpose(1, 2)  # rows not contiguous: copied first
    torch.testing.assert_close(native_softmax.softmax_bf16(x).float(), torch.softmax(x, -1).float(), rtol=ULP, atol=0)
    y = base.clone()
    out = native_softmax.softmax_bf16(y, out=y)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out.float(), torch.softmax(base, -1).float(), rtol=ULP, atol=0)


def test_not_bfloat16_or_not_a_cpu_tensor_is_left_to_torch():
    assert native_softmax.softmax_bf16(torch.randn(3, 20)) is None
    assert native_softmax.softmax_backward_bf16(torch.randn(3, 20), torch.rand(3, 20)) is None
    assert native_softmax.softmax_bf16(torch.zeros(3, 0, dtype=torch.bfloat16)) is None
    p = torch.rand(3, 20).to(torch.bfloat16)
    assert native_softmax.softmax_backward_bf16(torch.rand(3, 21).to(torch.bfloat16), p) is None  # shapes differ


def _attention(dtype: torch.dtype, padding: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 21, 8
    q, k, v = (torch.randn(batch, length, h, dim, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
               for h in (heads, kv_heads, kv_heads))
    real = torch.ones(batch, length, dtype=torch.bool)
    real[1, :padding] = False  # left padding: row(s) with no key left
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    out = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
    out.float().mul(torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), tuple(t.grad for t in (q, k, v))


@needs_kernel
@pytest.mark.parametrize("padding", [0, 4])
def test_grouped_attention_with_the_kernel_matches_torchs_ops_and_float64(padding, monkeypatch):
    assert native_softmax.softmax_kernel() is not None  # built and passed its load check: the first run uses it
    ours, grads = _attention(torch.bfloat16, padding)
    monkeypatch.setattr(native_softmax, "softmax_kernel", lambda: None)  # torch's softmax and its backward
    theirs, their_grads = _attention(torch.bfloat16, padding)
    exact, exact_grads = _attention(torch.float64, padding)
    assert torch.isfinite(ours).all()
    for a, b, c in zip((ours, *grads), (theirs, *their_grads), (exact, *exact_grads)):
        err_ours, err_theirs = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        assert err_ours <= 1.5 * err_theirs + 1e-3 * c.abs().max()  # as close to float64 as torch's bf16 ops
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.02 * float(c.abs().max()))
