"""Tests of srd_distill.losses against plain float64 formulas written independently here."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from srd_distill import divergences, kd_chunks, logit_postprocess, losses, t2_scaling
from srd_distill.losses import (
    LOSS_NAMES,
    T2_SCALING_MODES,
    kd_divergence,
    kd_objective,
    per_token_divergence,
    shift_for_next_token,
    t2_factor,
)

B, S, V = 3, 9, 37
TEMPERATURES = (0.5, 1.0, 2.5)
# The authors' per-loss T^2 choice, restated here rather than imported.
REFERENCE_SCALED = {"fkl", "jsd", "srkl"}
VANISHING = ("rkl", "jsd", "tvd", "srkl")  # zero when teacher == student
CROSS_ENTROPY_LIKE = ("fkl", "sfkl")  # equal to the teacher entropy when teacher == student


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: extra intra-op threads only add synchronisation, which is
    # slow on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------
# Independent float64 reference: full tensors, plain textbook formulas, autograd gradients
# ---------------------------------------------------------------------------------------


def ref_per_token(student, teacher, name, T, beta=0.1, alpha=0.1):
    p = torch.softmax(teacher.double() / T, dim=-1)
    q = torch.softmax(student.double() / T, dim=-1)
    if name == "fkl":
        return -(p * torch.log(q)).sum(-1)
    if name == "rkl":
        return (q * (torch.log(q) - torch.log(p))).sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        kl_qm = (q * (torch.log(q) - torch.log(m))).sum(-1)
        kl_pm = (p * (torch.log(p) - torch.log(m))).sum(-1)
        return (1 - beta) * kl_qm + beta * kl_pm
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "sfkl":
        m = alpha * p + (1 - alpha) * q
        return -(p * torch.log(m)).sum(-1)
    if name == "srkl":
        m = (1 - alpha) * p + alpha * q
        return (q * (torch.log(q) - torch.log(m))).sum(-1)
    raise AssertionError(name)


def ref_factor(name, T, mode):
    if mode == "all" or (mode == "reference" and name in REFERENCE_SCALED):
        return T * T
    return 1.0


def ref_kd(student, teacher, mask, name, T, mode, **coef):
    m = mask.double()
    return ref_factor(name, T, mode) * (ref_per_token(student, teacher, name, T, **coef) * m).sum() / m.sum()


def ref_ce(student, targets, mask):
    logp = torch.log_softmax(student.double(), dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    m = mask.double()
    return (nll * m).sum() / m.sum()


def ref_value_and_grad(fn, student):
    """fn(float64 leaf) -> scalar; returns (value, d value / d student) in float64."""
    leaf = student.detach().double().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def ours_value_and_grad(fn, student):
    leaf = student.detach().clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def make_inputs(seed, dtype=torch.float32, scale=3.0, b=B, s=S, v=V):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    teacher = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    mask = torch.rand(b, s, generator=g) < 0.6
    mask[0, -1] = True  # never empty
    mask[1, 0] = False  # at least one unscored position
    targets = torch.randint(0, v, (b, s), generator=g)
    targets[~mask] = -100  # ignored positions may hold anything
    return student, teacher, mask, targets


def assert_close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5])  # automatic sizes: test_chunk_size_does_not_change_the_result
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("t2_scaling", T2_SCALING_MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_float32_matches_float64_reference(name, t2_scaling, temperature, chunk_size):
    seed = 100 * LOSS_NAMES.index(name) + 10 * T2_SCALING_MODES.index(t2_scaling) + TEMPERATURES.index(temperature)
    student, teacher, mask, _ = make_inputs(seed)
    assert mask.sum() > 4  # chunk sizes 1 and 4 really split the scored tokens
    ref_v, ref_g = ref_value_and_grad(lambda s: ref_kd(s, teacher, mask, name, temperature, t2_scaling), student)
    v, g = ours_value_and_grad(
        lambda s: kd_divergence(s, teacher, mask, name, temperature, t2_scaling, chunk_size), student
    )
    assert v.dtype == torch.float32 and g.dtype == torch.float32
    assert_close(v, ref_v, rtol=2e-5, atol=1e-6)
    assert_close(g, ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_float64_inputs_are_computed_in_float64(name, temperature):
    student, teacher, mask, _ = make_inputs(7, torch.float64)
    ref_v, ref_g = ref_value_and_grad(lambda s: ref_kd(s, teacher, mask, name, temperature, "all"), student)
    v, g = ours_value_and_grad(lambda s: kd_divergence(s, teacher, mask, name, temperature, "all", 5), student)
    assert v.dtype == torch.float64
    assert_close(v, ref_v, rtol=1e-10, atol=1e-12)
    assert_close(g, ref_g, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", (0.7, 2.0))
@pytest.mark.parametrize("t2_scaling", T2_SCALING_MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_inputs(name, t2_scaling, temperature, dtype):
    student, teacher, mask, _ = make_inputs(11, dtype)
    # The reference sees the same (rounded) logits, upcast: only the loss's own arithmetic
    # (float32 per chunk) and the rounding of the gradient to the input dtype differ.
    ref_v, ref_g = ref_value_and_grad(lambda s: ref_kd(s, teacher, mask, name, temperature, t2_scaling), student)
    v, g = ours_value_and_grad(lambda s: kd_divergence(s, teacher, mask, name, temperature, t2_scaling, 3), student)
    assert v.dtype == torch.float32 and g.dtype == dtype
    assert_close(v, ref_v, rtol=1e-4, atol=1e-5)
    assert_close(g, ref_g, rtol=2e-2, atol=2e-4)


def test_mixed_dtypes_student_float32_teacher_bfloat16():
    student, teacher, mask, _ = make_inputs(12)
    teacher = teacher.bfloat16()
    ref_v, ref_g = ref_value_and_grad(lambda s: ref_kd(s, teacher, mask, "jsd", 2.0, "all"), student)
    v, g = ours_value_and_grad(lambda s: kd_divergence(s, teacher, mask, "jsd", 2.0, chunk_size=2), student)
    assert g.dtype == torch.float32
    assert_close(v, ref_v, rtol=2e-5, atol=1e-6)
    assert_close(g, ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_custom_coefficients(name):
    student, teacher, mask, _ = make_inputs(13)
    coef = {"beta": 0.5, "alpha": 0.3}
    ref_v, ref_g = ref_value_and_grad(lambda s: ref_kd(s, teacher, mask, name, 1.3, "none", **coef), student)
    v, g = ours_value_and_grad(
        lambda s: kd_divergence(s, teacher, mask, name, 1.3, "none", 4, jsd_beta=0.5, skew_alpha=0.3), student
    )
    assert_close(v, ref_v, rtol=2e-5, atol=1e-6)
    assert_close(g, ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_matches_finite_differences(name):
    # Central differences, independent of any hand-written reference. (torch.autograd.
    # gradcheck cannot be used: it calls backward several times on one graph, which the
    # loss refuses by design, see test_upstream_gradient_scale_and_single_backward.)
    student, teacher, mask, targets = make_inputs(14, torch.float64, b=2, s=3, v=5)

    def f(s):
        return kd_objective(s, teacher, targets, mask, name, 1.7, 0.6, "reference", 2).loss

    _, grad = ours_value_and_grad(f, student)
    numeric = torch.zeros_like(student)
    eps = 1e-6
    with torch.no_grad():
        for i in range(student.numel()):
            bump = torch.zeros(student.numel(), dtype=torch.float64)
            bump[i] = eps
            bump = bump.view_as(student)
            numeric.view(-1)[i] = (f(student + bump) - f(student - bump)) / (2 * eps)
    assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def test_per_token_divergence_matches_reference():
    student, teacher, _, _ = make_inputs(15)
    for name in LOSS_NAMES:
        ours = per_token_divergence(student, teacher, name, 1.5)
        assert ours.shape == (B, S)
        assert_close(ours, ref_per_token(student, teacher, name, 1.5), rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_teacher_equal_to_student(name, temperature):
    student, _, mask, _ = make_inputs(16)
    v, g = ours_value_and_grad(lambda s: kd_divergence(s, student, mask, name, temperature, "none", 3), student)
    if name in VANISHING:
        assert abs(float(v)) < 1e-6
    else:
        assert name in CROSS_ENTROPY_LIKE
        p = torch.softmax(student.double() / temperature, -1)
        entropy = (-(p * p.log()).sum(-1) * mask).sum() / mask.sum()
        assert_close(v, entropy, rtol=1e-5, atol=1e-6)
    # Every loss is stationary at the teacher.
    assert float(g.abs().max()) < 1e-6


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_unscored_positions_change_nothing(name):
    student, teacher, mask, targets = make_inputs(17)
    base_v, base_g = ours_value_and_grad(
        lambda s: kd_objective(s, teacher, targets, mask, name, 2.0, 0.7, "all", 3).loss, student
    )
    s2, t2, y2 = student.clone(), teacher.clone(), targets.clone()
    off = ~mask
    s2[off] = torch.randn(int(off.sum()), V) * 50
    t2[off] = float("nan")  # not even NaNs leak from prompt/padding positions
    y2[off] = 10**9
    v, g = ours_value_and_grad(lambda s: kd_objective(s, t2, y2, mask, name, 2.0, 0.7, "all", 3).loss, s2)
    assert torch.equal(v, base_v)
    assert torch.equal(g, base_g)
    assert torch.count_nonzero(g[off]) == 0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_chunk_size_does_not_change_the_result(name):
    student, teacher, mask, targets = make_inputs(18)
    results = [
        ours_value_and_grad(lambda s: kd_objective(s, teacher, targets, mask, name, 1.5, 0.5, "all", c).loss, student)
        for c in (1, 2, 5, 1000, None)
    ]
    for v, g in results[1:]:
        assert_close(v, results[0][0], rtol=1e-6, atol=1e-7)
        assert_close(g, results[0][1], rtol=1e-6, atol=1e-8)


def test_t2_scaling_modes_are_plain_factors():
    assert {n for n in LOSS_NAMES if t2_factor(n, 3.0, "reference") == 9.0} == REFERENCE_SCALED
    assert all(t2_factor(n, 3.0, "all") == 9.0 and t2_factor(n, 3.0, "none") == 1.0 for n in LOSS_NAMES)
    assert losses.DEFAULT_T2_SCALING == "all"
    student, teacher, mask, _ = make_inputs(19)
    for name in LOSS_NAMES:
        unscaled = kd_divergence(student, teacher, mask, name, 2.0, "none")
        assert_close(kd_divergence(student, teacher, mask, name, 2.0, "all"), 4 * unscaled, rtol=1e-6, atol=0)
        ref = kd_divergence(student, teacher, mask, name, 2.0, "reference")
        assert_close(ref, (4 if name in REFERENCE_SCALED else 1) * unscaled, rtol=1e-6, atol=0)


def test_no_grad_path_gives_the_same_values():
    student, teacher, mask, targets = make_inputs(20)
    with_grad = kd_objective(student.clone().requires_grad_(True), teacher, targets, mask, "srkl", 2.0, 0.8, chunk_size=4)
    with torch.no_grad():
        without = kd_objective(student.clone().requires_grad_(True), teacher, targets, mask, "srkl", 2.0, 0.8, chunk_size=4)
    plain = kd_objective(student, teacher, targets, mask, "srkl", 2.0, 0.8, chunk_size=4)
    for out in (without, plain):
        assert not out.loss.requires_grad
        for a, b in zip(out, with_grad):
            assert_close(a, b.detach(), rtol=1e-6, atol=0)


def test_empty_mask_gives_zero_loss_and_zero_grad():
    student, teacher, _, targets = make_inputs(21)
    mask = torch.zeros(B, S, dtype=torch.bool)
    v, g = ours_value_and_grad(lambda s: kd_objective(s, teacher, targets, mask, "fkl", 1.0, 0.5).loss, student)
    assert float(v) == 0.0 and torch.count_nonzero(g) == 0


def test_padded_vocabulary_with_minus_inf_logits():
    # Rows of -inf in both models (padded embedding matrices) must neither produce NaN nor
    # change anything: the result equals the one on the unpadded vocabulary.
    student, teacher, mask, targets = make_inputs(22)
    pad = torch.full((B, S, 5), float("-inf"))
    s_pad, t_pad = torch.cat([student, pad], -1), torch.cat([teacher, pad], -1)
    for name in LOSS_NAMES:
        v, g = ours_value_and_grad(lambda s: kd_objective(s, t_pad, targets, mask, name, 2.0, 0.5, chunk_size=4).loss, s_pad)
        v0, g0 = ours_value_and_grad(lambda s: kd_objective(s, teacher, targets, mask, name, 2.0, 0.5, chunk_size=4).loss, student)
        assert torch.isfinite(v) and torch.isfinite(g).all(), name
        assert_close(v, v0, rtol=1e-6, atol=1e-7)
        assert_close(g[..., :V], g0, rtol=1e-5, atol=1e-8)
        assert torch.count_nonzero(g[..., V:]) == 0


def test_float16_large_logits_small_temperature_do_not_overflow():
    student, teacher, mask, _ = make_inputs(23, torch.float32, scale=20000.0)
    # Finite in float16 (max 65504), but logits / 0.5 would overflow if divided in float16.
    student, teacher = (x.clamp(-60000, 60000).half() for x in (student, teacher))
    assert torch.isfinite(student).all() and float(student.abs().max()) > 40000
    for name in LOSS_NAMES:
        v, g = ours_value_and_grad(lambda s: kd_divergence(s, teacher, mask, name, 0.5, chunk_size=4), student)
        assert torch.isfinite(v) and torch.isfinite(g).all(), name


# ---------------------------------------------------------------------------------------
# The combined objective
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_kd_ratio_zero_is_plain_cross_entropy(temperature):
    student, teacher, mask, targets = make_inputs(24)
    ours_v, ours_g = ours_value_and_grad(
        lambda s: kd_objective(s, teacher, targets, mask, "rkl", temperature, 0.0, chunk_size=4).loss, student
    )
    torch_v, torch_g = ours_value_and_grad(
        lambda s: F.cross_entropy(s.reshape(-1, V), targets.reshape(-1), ignore_index=-100), student
    )
    assert_close(ours_v, torch_v, rtol=1e-6, atol=1e-6)
    assert_close(ours_g, torch_g, rtol=1e-5, atol=1e-7)
    out = kd_objective(student, teacher, targets, mask, "rkl", temperature, 0.0)
    assert_close(out.ce_loss, torch_v, rtol=1e-6, atol=1e-6)
    assert float(out.kd_loss) > 0  # still computed, for logging


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_kd_ratio_one_is_the_divergence(name):
    student, teacher, mask, targets = make_inputs(25)
    a_v, a_g = ours_value_and_grad(lambda s: kd_objective(s, teacher, targets, mask, name, 2.0, 1.0, "reference", 4).loss, student)
    b_v, b_g = ours_value_and_grad(lambda s: kd_divergence(s, teacher, mask, name, 2.0, "reference", 4), student)
    assert_close(a_v, b_v, rtol=1e-6, atol=0)
    assert_close(a_g, b_g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mixed_objective_matches_reference(name, dtype):
    student, teacher, mask, targets = make_inputs(26, dtype)
    kd_ratio, T = 0.8, 1.5

    def ref(s):
        return (1 - kd_ratio) * ref_ce(s, targets, mask) + kd_ratio * ref_kd(s, teacher, mask, name, T, "all")

    ref_v, ref_g = ref_value_and_grad(ref, student)
    v, g = ours_value_and_grad(lambda s: kd_objective(s, teacher, targets, mask, name, T, kd_ratio, "all", 3).loss, student)
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-5)
    gtol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)
    assert_close(v, ref_v, **tol)
    assert_close(g, ref_g, **gtol)
    out = kd_objective(student, teacher, targets, mask, name, T, kd_ratio, "all", 3)
    assert_close(out.ce_loss, ref_ce(student, targets, mask), **tol)
    assert_close(out.kd_loss, ref_kd(student, teacher, mask, name, T, "all"), **tol)
    assert not out.ce_loss.requires_grad and not out.kd_loss.requires_grad


def test_shifted_views_and_gradient_through_an_lm_head():
    # The usual training call: a causal LM's logits, shifted by slicing (non-contiguous
    # views), gradient flowing on into the output layer's weights.
    g = torch.Generator().manual_seed(27)
    hidden = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(16, V, bias=False).double()
    teacher_logits = torch.randn(2, 8, V, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, V, (2, 8), generator=g)
    response = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])

    s, t, y, m = shift_for_next_token(head(hidden), teacher_logits, input_ids, response)
    assert not s.is_contiguous()
    loss = kd_objective(s, t, y, m, "jsd", 2.0, 0.9, chunk_size=3).loss
    (ours,) = torch.autograd.grad(loss, head.weight)

    s = head(hidden)[:, :-1]
    ref = 0.1 * ref_ce(s, y, m) + 0.9 * ref_kd(s, t, m, "jsd", 2.0, "all")
    (expected,) = torch.autograd.grad(ref, head.weight)
    assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_upstream_gradient_scale_and_single_backward():
    student, teacher, mask, targets = make_inputs(28)
    _, g1 = ours_value_and_grad(lambda s: kd_objective(s, teacher, targets, mask, "tvd", 2.0, 0.5).loss, student)
    _, g3 = ours_value_and_grad(lambda s: 3.0 * kd_objective(s, teacher, targets, mask, "tvd", 2.0, 0.5).loss, student)
    assert_close(g3, 3 * g1, rtol=1e-6, atol=1e-9)

    leaf = student.clone().requires_grad_(True)
    loss = kd_objective(leaf, teacher, targets, mask, "tvd", 2.0, 0.5).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward pass"):
        loss.backward()


def test_teacher_gets_no_gradient():
    student, teacher, mask, _ = make_inputs(29)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    kd_divergence(student, teacher, mask, "fkl").backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_error_messages():
    student, teacher, mask, targets = make_inputs(30)
    with pytest.raises(ValueError, match=r"unknown KD loss 'kl'; valid names: fkl, rkl, jsd, tvd, sfkl, srkl"):
        kd_divergence(student, teacher, mask, "kl")
    with pytest.raises(ValueError, match=r"unknown t2_scaling 'some'; valid modes: reference, all, none"):
        kd_divergence(student, teacher, mask, "fkl", 2.0, "some")
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq\) = \(3, 9\).*got \(3, 8\)"):
        kd_divergence(student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match=r"vocabularies differ.*len\(tokenizer\)"):
        kd_divergence(student, teacher[..., :-1], mask)
    with pytest.raises(ValueError, match=r"same \(batch, seq, vocab\) shape"):
        kd_divergence(student, teacher[:, :-1], mask)
    with pytest.raises(ValueError, match=r"student_logits must have shape \(batch, seq, vocab\), got shape \(27, 37\)"):
        kd_divergence(student.reshape(-1, V), teacher.reshape(-1, V), mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        kd_divergence(student, teacher, mask.long() * 2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        kd_divergence(student, teacher, mask, "fkl", 0.0)
    with pytest.raises(ValueError, match="jsd_beta must lie strictly between 0 and 1"):
        kd_divergence(student, teacher, mask, "jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        kd_divergence(student, teacher, mask, chunk_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        kd_divergence(student.long(), teacher, mask)
    with pytest.raises(ValueError, match=r"kd_ratio must be a number in \[0, 1\]"):
        kd_objective(student, teacher, targets, mask, "fkl", 1.0, 1.5)
    with pytest.raises(ValueError, match=r"targets must have shape \(batch, seq\) = \(3, 9\).*already shifted"):
        kd_objective(student, teacher, targets[:, 1:], mask, "fkl", 1.0, 0.5)
    bad = targets.clone()
    bad[mask.nonzero()[0].tolist()] = -100
    with pytest.raises(ValueError, match=r"targets at scored positions \(mask = 1\) must be token ids in \[0, 37\)"):
        kd_objective(student, teacher, bad, mask, "fkl", 1.0, 0.5)
    with pytest.raises(TypeError, match="integer token ids"):
        kd_objective(student, teacher, targets.float(), mask, "fkl", 1.0, 0.5)


def test_docstring_examples():
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("module", [divergences, t2_scaling, kd_chunks, logit_postprocess], ids=lambda m: m.__name__)
def test_docstring_examples_of_the_loss_modules(module):
    # The divergences, T^2 rule, chunk math and logit post-processing live in their own
    # modules; their examples run here, as losses.py's do above.
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, module.__name__


def test_loss_registry_is_complete():
    assert LOSS_NAMES == ("fkl", "rkl", "jsd", "tvd", "sfkl", "srkl")
    assert set(losses.LOSS_FORMULAS) == set(LOSS_NAMES)
    assert math.isclose(t2_factor("srkl", 1.5, "reference"), 2.25)
