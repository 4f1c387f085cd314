"""srd-distill's native fkl + CE kernel for bfloat16 logits (srd_distill/native_kd.py, kernels/kd_fkl.c).

Checked against a float64 reference and against ``chunk_terms``' torch ops on random logits
(temperatures 1, 2 and others, with and without targets, vocabularies with a tail, strided
rows), then through the fused LM head of a bfloat16 training step on tiny Llamas, with and
without the kernel. Other losses, dtypes and rows it cannot take go to torch's ops.
"""

from __future__ import annotations

import pytest
import torch

from srd_distill import native_kd
from srd_distill.divergences import teacher_entropy_meter
from srd_distill.kd_chunks import chunk_terms
from srdata.backends import native

REASON = native.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"srdata's native kernel cannot be built here: {REASON}")


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_s = (scale * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16)
    z_t = (scale * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16)
    return z_s, z_t, torch.randint(0, vocab, (rows,), generator=g)


def _terms(z_s, z_t, y, temperature, need_grad=True, loss_name="fkl", ce_weight=0.3, kd_weight=0.7):
    return chunk_terms(z_s, z_t, y, cdtype=torch.float32, n_scored=50, need_grad=need_grad, loss_name=loss_name,
                       temperature=temperature, factor=temperature**2, ce_weight=ce_weight, kd_weight=kd_weight, coef=0.1)


@needs_kernel
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 3.5])
@pytest.mark.parametrize("vocab", [16, 1000, 4099])
def test_kernel_matches_float64(temperature, vocab):
    z_s, z_t, y = _logits(7, vocab, seed=vocab)
    for targets in (y, None):
        ce_scale = 0.02 if targets is not None else 0.0
        ours = native_kd.fkl_chunk_terms(z_s, z_t, targets, temperature=temperature, kd_scale=0.05, ce_scale=ce_scale)
        exact = native_kd.reference(z_s, z_t, targets, temperature, 0.05, ce_scale)
        for name, got, want in zip(("kd", "ce", "entropy", "grad"), ours[:4], exact[:4]):
            error = float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))
            assert error < 2e-6, (name, error)
        assert torch.equal(ours.grad_bf16, ours.grad_f32.to(torch.bfloat16))  # one rounding, to nearest even
    assert native_kd.fkl_chunk_terms(z_s, z_t, None, temperature=temperature, kd_scale=0.1, ce_scale=0.0,
                                     need_grad=False).grad_f32 is None


@needs_kernel
def test_strided_rows_and_two_threads_give_the_contiguous_one_thread_result():
    wide_s, wide_t, y = _logits(6, 300, seed=4)
    z_s, z_t = wide_s[:, :257], wide_t[:, 10:267]  # rows 300 elements apart
    function = native_kd.fkl_kernel()
    strided = native_kd._launch(function, z_s, z_t, y % 257, 2.0, 0.1, 0.05, True, 2)
    dense = native_kd._launch(function, z_s.contiguous(), z_t.contiguous(), y % 257, 2.0, 0.1, 0.05, True, 1)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_chunk_terms_on_bfloat16_logits_equal_the_torch_ops_and_feed_the_entropy_meter(temperature):
    z_s, z_t, y = _logits(9, 777, seed=11)
    with teacher_entropy_meter() as native_meter:
        ours = _terms(z_s, z_t, y, temperature)
    with teacher_entropy_meter() as torch_meter:
        theirs = _terms(z_s.float(), z_t.float(), y, temperature)  # float32 logits: torch's ops, same values
    assert ours.grad_bf16 is not None and theirs.grad_bf16 is None
    torch.testing.assert_close(ours.ce_sum, theirs.ce_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.kd_sum, theirs.kd_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-9)
    assert native_meter.tokens == torch_meter.tokens == 9
    assert native_meter.mean == pytest.approx(torch_meter.mean, rel=1e-5)
    no_grad = _terms(z_s, z_t, None, temperature, need_grad=False)
    assert no_grad.grad is None and float(no_grad.ce_sum) == 0.0
    kd_only = _terms(z_s, z_t, y, temperature, ce_weight=0.0, kd_weight=1.0)
    torch.testing.assert_close(kd_only.grad, _terms(z_s.float(), z_t.float(), y, temperature, ce_weight=0.0, kd_weight=1.0).grad,
                               rtol=1e-4, atol=1e-9)


@needs_kernel
def test_rows_and_settings_the_kernel_does_not_take_go_to_torchs_ops():
    z_s, z_t, y = _logits(4, 200, seed=2)
    inf_row = z_s.clone()
    inf_row[1, 7] = float("-inf")  # a masked vocabulary entry: torch's ops floor its log
    assert native_kd.fkl_chunk_terms(inf_row, z_t, y, temperature=2.0, kd_scale=0.1, ce_scale=0.1) is None
    ours = _terms(inf_row, z_t, y, 2.0)
    theirs = _terms(inf_row.float(), z_t.float(), y, 2.0)
    assert ours.grad_bf16 is None and torch.equal(ours.grad, theirs.grad) and torch.equal(ours.kd_sum, theirs.kd_sum)
    assert native_kd.fkl_chunk_terms(z_s, z_t, y + 200, temperature=2.0, kd_scale=0.1, ce_scale=0.1) is None  # target out of range
    assert native_kd.fkl_chunk_terms(z_s.float(), z_t.float(), y, temperature=2.0, kd_scale=0.1, ce_scale=0.1) is None
    assert _terms(z_s, z_t, y, 2.0, loss_name="rkl").grad_bf16 is None  # other losses: torch's ops


def test_without_the_kernel_chunk_terms_runs_torchs_ops(monkeypatch):
    monkeypatch.setattr(native_kd, "fkl_kernel", lambda: None)  # another CPU, no compiler, or SRDATA_NATIVE_KERNELS=0
    z_s, z_t, y = _logits(5, 300, seed=8)
    ours, theirs = _terms(z_s, z_t, y, 2.0), _terms(z_s.float(), z_t.float(), y, 2.0)
    assert ours.grad_bf16 is None
    assert torch.equal(ours.grad, theirs.grad) and torch.equal(ours.kd_sum, theirs.kd_sum) and torch.equal(ours.ce_sum, theirs.ce_sum)


@needs_kernel
def test_bfloat16_training_step_through_the_fused_head_matches_torchs_ops(monkeypatch):
    from srd_distill.memory import autocast_context
    from tests.test_distill_bf16 import CPU, objective_and_grads, tiny_batch, tiny_llama

    student, teacher, batch = tiny_llama(64, seed=1), tiny_llama(64, seed=2), tiny_batch()
    teacher = teacher.to(torch.bfloat16).eval().requires_grad_(False)
    calls = []
    real = native_kd.fkl_chunk_terms
    monkeypatch.setattr(native_kd, "fkl_chunk_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads = objective_and_grads(student, teacher, batch, autocast_context(CPU, torch.bfloat16))
    assert calls  # the kernel ran
    monkeypatch.setattr(native_kd, "fkl_kernel", lambda: None)
    loss_torch, grads_torch = objective_and_grads(student, teacher, batch, autocast_context(CPU, torch.bfloat16))
    assert loss == pytest.approx(loss_torch, rel=1e-5)
    for name, grad in grads.items():
        # The same bf16 matmuls on gradients that differ by float32 rounding (then one bf16 rounding each).
        error = float((grad - grads_torch[name]).norm() / grads_torch[name].norm())
        assert error < 2e-3, (name, error)


@needs_kernel
@pytest.mark.parametrize("buffer_tokens", [8, 1024])  # flushes at 8, 16, 21 tokens / one flush
def test_cpu_bfloat16_head_weight_gradient_is_the_bf16_product_of_the_buffered_logit_gradients(monkeypatch, buffer_tokens):
    from srd_distill import fused_head
    from srd_distill.fused_head import HeadWeights, LogitPostprocess, fused_kd_objective

    monkeypatch.setattr(fused_head, "WEIGHT_GRAD_TOKENS", buffer_tokens)
    seen = []
    real = native_kd.fkl_chunk_terms
    monkeypatch.setattr(native_kd, "fkl_chunk_terms", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    g = torch.Generator().manual_seed(6)
    n, vocab, hidden = 21, 300, 32
    h_s = torch.randn(n, hidden, generator=g).requires_grad_(True)
    w_s = (0.3 * torch.randn(vocab, hidden, generator=g)).requires_grad_(True)
    h_t, w_t = torch.randn(n, hidden, generator=g).bfloat16(), (0.3 * torch.randn(vocab, hidden, generator=g)).bfloat16()
    y = torch.randint(0, vocab, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_kd_objective(h_s, HeadWeights(w_s, None, LogitPostprocess()), h_t, HeadWeights(w_t, None, LogitPostprocess()),
                                 y, "fkl", 2.0, 0.9, chunk_size=4)
    out.loss.backward()
    assert len(seen) == 6 and all(t is not None for t in seen)  # every chunk on the kernel
    dz = torch.cat([t.grad_bf16 for t in seen]).double()
    exact = dz.t() @ h_s.detach().bfloat16().double()  # the same bf16 logit gradients and hidden states, in float64
    error = float((w_s.grad.double() - exact).abs().max() / exact.abs().max())
    assert 0 < error < 4e-3  # bf16 rounding of each product, nothing more
    exact_h = dz @ w_s.detach().bfloat16().double()
    assert float((h_s.grad.double() - exact_h).abs().max() / exact_h.abs().max()) < 4e-3
