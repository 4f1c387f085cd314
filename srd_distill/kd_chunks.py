"""The KD objective one chunk of scored tokens at a time, shared by the logit and fused-head paths.

:func:`chunk_terms` is the math of every loss path: the CE and KD values of one chunk and
their gradient w.r.t. the student's logits, computed together in one pass (closed-form
gradients from :mod:`srd_distill.divergences`). :func:`loss_with_forward_gradients` wraps a
whole chunked pass for autograd: since each pass computes its gradients as it goes, no
autograd graph holding float32 copies of the logits is built, and ``backward`` only hands
the finished gradients over. :func:`srd_distill.losses.kd_objective` (logits given) and
:func:`srd_distill.fused_head.fused_kd_objective` (logits projected from hidden states
chunk by chunk) both use these, so they cannot drift apart.

Example:
    >>> settings = objective_settings("fkl", 2.0, "all", kd_ratio=0.5, jsd_beta=0.1, skew_alpha=0.1)
    >>> settings.factor, settings.ce_weight, settings.kd_weight
    (4.0, 0.5, 0.5)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from srd_distill.divergences import (
    check_divergence_settings,
    check_loss_name,
    distribution,
    divergence,
    divergence_coef,
    record_teacher_entropy,
)
from srd_distill.t2_scaling import check_t2_scaling, t2_factor

__all__ = [
    "MAX_AUTO_CHUNK_TOKENS",
    "ChunkLossSettings",
    "objective_settings",
    "check_kd_ratio",
    "check_chunk_size",
    "ChunkTerms",
    "chunk_terms",
    "weighted_total",
    "PassResult",
    "loss_with_forward_gradients",
]

#: The most tokens an automatic chunk size picks, however small the vocabulary.
MAX_AUTO_CHUNK_TOKENS = 4096


class ChunkLossSettings(NamedTuple):
    """The scalar settings :func:`chunk_terms` reads (pass them as ``**settings._asdict()``)."""

    loss_name: str
    temperature: float
    factor: float  # the T^2 factor of the KD term (srd_distill.t2_scaling)
    ce_weight: float
    kd_weight: float
    coef: float  # the divergence's mixture weight (jsd_beta or skew_alpha)


def check_kd_ratio(kd_ratio: float) -> None:
    """Raise a ValueError unless ``kd_ratio`` is a number in [0, 1].

    Example:
        >>> check_kd_ratio(1.5)
        Traceback (most recent call last):
        ValueError: kd_ratio must be a number in [0, 1], got 1.5
    """
    if not (isinstance(kd_ratio, (int, float)) and 0.0 <= kd_ratio <= 1.0):
        raise ValueError(f"kd_ratio must be a number in [0, 1], got {kd_ratio!r}")


def objective_settings(
    loss_name: str,
    temperature: float,
    t2_scaling: str,
    *,
    kd_ratio: float | None,
    jsd_beta: float,
    skew_alpha: float,
) -> ChunkLossSettings:
    """Check the loss settings and turn them into :class:`ChunkLossSettings`.

    ``kd_ratio`` weighs the KD term against the CE term (``1 - kd_ratio``); ``None`` asks
    for the KD term alone (weight 1, no CE).

    Example:
        >>> objective_settings("jsd", 1.0, "none", kd_ratio=None, jsd_beta=0.2, skew_alpha=0.1)
        ChunkLossSettings(loss_name='jsd', temperature=1.0, factor=1.0, ce_weight=0.0, kd_weight=1.0, coef=0.2)
    """
    check_loss_name(loss_name)
    check_t2_scaling(t2_scaling)
    check_divergence_settings(temperature, jsd_beta, skew_alpha)
    if kd_ratio is not None:
        check_kd_ratio(kd_ratio)
    kd_weight = 1.0 if kd_ratio is None else float(kd_ratio)
    return ChunkLossSettings(
        loss_name=loss_name,
        temperature=float(temperature),
        factor=t2_factor(loss_name, temperature, t2_scaling),
        ce_weight=0.0 if kd_ratio is None else 1.0 - kd_weight,
        kd_weight=kd_weight,
        coef=divergence_coef(loss_name, jsd_beta, skew_alpha),
    )


def check_chunk_size(chunk_size: Any) -> int:
    """Return ``chunk_size`` when it is a positive int, else raise a ValueError.

    Example:
        >>> check_chunk_size(0)
        Traceback (most recent call last):
        ValueError: chunk_size must be a positive int or None (automatic), got 0
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    return chunk_size


class ChunkTerms(NamedTuple):
    """What one chunk of scored tokens contributes (see :func:`chunk_terms`)."""

    ce_sum: Tensor  # sum over the chunk's tokens of -log softmax(z)[y] (0 without targets)
    kd_sum: Tensor  # sum over the chunk's tokens of the divergence (no T^2 factor)
    grad: Tensor | None  # d(ce_weight * CE mean + kd_weight * KD mean) / d z_student, (chunk, vocab)
    grad_bf16: Tensor | None = None  # the same gradient rounded to bfloat16, where the native kernel wrote it too


def chunk_terms(
    z_student: Tensor, z_teacher: Tensor, y: Tensor | None, *, cdtype: torch.dtype, n_scored: int, need_grad: bool,
    loss_name: str, temperature: float, factor: float, ce_weight: float, kd_weight: float, coef: float,
) -> ChunkTerms:
    """Values and logit gradient of one chunk of scored tokens: the math of every loss path.

    ``z_student`` and ``z_teacher`` are ``(chunk, vocab)`` logits (any float dtype, upcast
    here to ``cdtype``), ``y`` the ``(chunk,)`` targets or None (no CE term). The gradient
    is that of the *whole batch's* token means (``n_scored`` tokens), so chunks simply
    add up.

    Example:
        >>> z = torch.randn(3, 7)
        >>> t = chunk_terms(z, z, torch.tensor([1, 2, 3]), cdtype=torch.float32, n_scored=3, need_grad=False,
        ...                 loss_name="rkl", temperature=1.0, factor=1.0, ce_weight=0.5, kd_weight=0.5, coef=0.1)
        >>> float(t.kd_sum), t.grad is None
        (0.0, True)
    """
    inv_n = 1.0 / max(n_scored, 1)
    # d(kd_weight * factor * mean_i D_i)/dz = kd_weight * factor / n * dD/ds / T.
    kd_grad_scale = kd_weight * factor * inv_n / temperature
    want_kd_grad = need_grad and kd_weight != 0.0
    want_ce_grad = need_grad and y is not None and ce_weight != 0.0
    if loss_name == "fkl" and cdtype == torch.float32 and z_student.dtype == z_teacher.dtype == torch.bfloat16:
        # bfloat16 logits on a CPU: srdata's native kernel, one pass where torch makes ~20 (srd_distill.native_kd).
        from srd_distill.native_kd import fkl_chunk_terms

        native = fkl_chunk_terms(z_student, z_teacher, y, temperature=temperature, kd_scale=kd_grad_scale if want_kd_grad else 0.0,
                                 ce_scale=ce_weight * inv_n if want_ce_grad else 0.0, need_grad=want_kd_grad or want_ce_grad)
        if native is not None:
            record_teacher_entropy(native.entropy.sum().to(cdtype), native.entropy.shape[0])
            return ChunkTerms(native.ce.sum().to(cdtype), native.kd.sum().to(cdtype), native.grad_f32 if need_grad else None,
                              native.grad_bf16 if need_grad else None)
    q = distribution(z_student, cdtype, temperature)
    value, grad_s = divergence(loss_name, q, distribution(z_teacher, cdtype, temperature), want_kd_grad, coef)
    kd_sum = value.sum()
    chunk_grad = grad_s.mul_(kd_grad_scale) if grad_s is not None else None
    del grad_s
    ce_sum = torch.zeros((), dtype=cdtype, device=z_student.device)
    if y is not None:
        y = y.unsqueeze(-1)
        # CE is always at T = 1; reuse the KD distribution when T is 1 already.
        q1 = q if temperature == 1.0 else distribution(z_student, cdtype, 1.0)
        ce_sum = -q1.log.gather(-1, y).sum()
        if want_ce_grad:
            # d CE / dz = softmax(z) - onehot(y), averaged over the n scored tokens;
            # built in q1.prob's storage, whose last use this is.
            ce_grad = q1.prob.scatter_add_(-1, y, torch.full_like(y, -1.0, dtype=cdtype))
            if chunk_grad is None:
                chunk_grad = ce_grad.mul_(ce_weight * inv_n)
            else:
                chunk_grad.add_(ce_grad, alpha=ce_weight * inv_n)
            del ce_grad
        del q1
    return ChunkTerms(ce_sum, kd_sum, chunk_grad if need_grad else None)


def weighted_total(ce_weight: float, ce: Tensor, kd_weight: float, kd: Tensor) -> Tensor:
    """``ce_weight * ce + kd_weight * kd``, leaving out zero-weight terms (0 * inf = NaN).

    Example:
        >>> weighted_total(0.0, torch.tensor(float("inf")), 1.0, torch.tensor(2.0))
        tensor(2.)
    """
    if kd_weight == 0.0:
        return ce_weight * ce
    if ce_weight == 0.0:
        return kd_weight * kd
    return ce_weight * ce + kd_weight * kd


class PassResult(NamedTuple):
    """What a whole chunked pass returns to :func:`loss_with_forward_gradients`."""

    ce: Tensor  # mean CE over scored tokens (0 when not computed)
    kd: Tensor  # mean divergence over scored tokens, T^2 factor applied
    grads: tuple[Tensor | None, ...]  # d(weighted total) / d input, one per input of the pass


#: ``run_pass(needs_grad, *inputs)``: ``needs_grad[i]`` says whether ``inputs[i]`` wants a gradient.
RunPass = Callable[..., PassResult]


class _GradientsFromForward(torch.autograd.Function):
    """Autograd wrapper of a pass that computes its gradients in the forward pass, chunk by chunk.

    Computing them there (instead of saving float32 activations for a backward pass) is
    what keeps memory at one chunk of float32 work space. Outputs: the weighted total
    (differentiable), the CE and KD means (for logging, not differentiable).
    """

    @staticmethod
    def forward(ctx, run_pass, settings, what, *inputs):  # type: ignore[override]
        result = run_pass(ctx.needs_input_grad[3:], *inputs)
        ctx.grads, ctx.what = result.grads, what
        total = weighted_total(settings.ce_weight, result.ce, settings.kd_weight, result.kd)
        ce, kd = result.ce.clone(), result.kd.clone()
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total, grad_ce, grad_kd):  # type: ignore[override]
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                f"the {ctx.what} KD loss supports one backward pass per forward pass (its gradients are "
                "handed to autograd, not copied); recompute the loss to differentiate again"
            )
        ctx.grads = None  # hand the buffers over instead of keeping second copies alive
        # One host sync per step skips a full pass over the gradients in the usual case
        # (loss.backward() seeds 1.0; a GradScaler or a micro-batch share otherwise); a
        # Python float keeps the scale exact for bf16 gradients.
        scale = float(grad_total)
        if scale != 1.0:
            grads = tuple(g.mul_(scale) if g is not None else None for g in grads)
        return (None, None, None, *grads)


def loss_with_forward_gradients(
    run_pass: RunPass, inputs: tuple[Tensor | None, ...], settings: ChunkLossSettings, what: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, ce, kd)`` of ``run_pass(needs_grad, *inputs)``; ``total`` carries its gradients.

    When grad mode is on and an input requires grad, the pass runs once with gradients
    and ``total.backward()`` hands them to autograd (one backward per forward; ``what``
    names the loss in that error). Otherwise it runs once for values only.

    Example:
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> def square(needs_grad, t):  # KD term t^2 with its gradient 2t, no CE
        ...     return PassResult(torch.zeros(()), (t * t).sum(), (2 * t if needs_grad[0] else None,))
        >>> settings = objective_settings("fkl", 1.0, "all", kd_ratio=None, jsd_beta=0.1, skew_alpha=0.1)
        >>> total, ce, kd = loss_with_forward_gradients(square, (x,), settings, "toy")
        >>> total.backward(); x.grad
        tensor([4.])
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _GradientsFromForward.apply(run_pass, settings, what, *inputs)
    with torch.no_grad():  # evaluation: values only, no gradient buffers
        result = run_pass((False,) * len(inputs), *inputs)
    return weighted_total(settings.ce_weight, result.ce, settings.kd_weight, result.kd), result.ce, result.kd
