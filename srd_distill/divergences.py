"""The six per-token KD divergences, each with its closed-form gradient w.r.t. the student's logits.

With ``p = softmax(z_teacher / T)`` and ``q = softmax(z_student / T)`` per token:

======  ===============================================================  ==================
name    per-token divergence                                            ``reference`` T^2
======  ===============================================================  ==================
fkl     ``-sum p log q`` (forward KL up to the teacher entropy)          yes
rkl     ``sum q (log q - log p)`` (reverse KL)                           no
jsd     ``m = b p + (1-b) q``; ``(1-b) KL(q||m) + b KL(p||m)``, b = 0.1  yes
tvd     ``0.5 sum |p - q|`` (total variation)                            no
sfkl    ``m = a p + (1-a) q``; ``-sum p log m``, a = 0.1 (skew forward)  no
srkl    ``m = (1-a) p + a q``; ``sum q (log q - log m)``, a = 0.1        yes
======  ===============================================================  ==================

``fkl`` and ``sfkl`` are cross-entropies, as in the reference code: they equal the
teacher entropy ``H(p)`` (not 0) when student and teacher agree; their gradients do vanish
there. Inside :func:`teacher_entropy_meter` every :func:`divergence` of these two also adds
``H(p)`` of its tokens up, so a training log can show the true KL, ``value - H(p)`` (0 when
student and teacher agree), beside the loss. ``b`` is ``jsd_beta`` and ``a`` is ``skew_alpha``. The T^2 column is
:mod:`srd_distill.t2_scaling`'s ``"reference"`` mode.

Every divergence takes the student's q and the teacher's p as :class:`Distribution` pairs
(floored log-probabilities and probabilities, float32 or wider, shape ``(tokens, vocab)``,
temperature applied) and returns the per-token value ``(tokens,)`` and, if asked, dL/ds
where ``s = z_student / T``. With ``q = softmax(s)`` and ``g = dL/dq``, the chain rule
through the softmax gives ``dL/ds_i = q_i * (g_i - sum_j q_j g_j)``, so any term of g that
is constant across the vocabulary cancels. The divergences never modify their inputs (the
CE term of :func:`srd_distill.kd_chunks.chunk_terms` may reuse the student's distribution).

Example:
    >>> z = torch.tensor([[0.0, 1.0, 2.0]])
    >>> value, grad = divergence("rkl", distribution(z, torch.float64, 1.0), distribution(z, torch.float64, 1.0), True, 0.1)
    >>> float(value[0]), grad.abs().max().item()
    (0.0, 0.0)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Literal, NamedTuple, get_args

import torch
from torch import Tensor

__all__ = [
    "KDLossName",
    "LOSS_NAMES",
    "LOSS_FORMULAS",
    "LOG_FLOOR",
    "Distribution",
    "distribution",
    "divergence",
    "divergence_coef",
    "check_loss_name",
    "check_divergence_settings",
    "per_token_divergence",
    "CROSS_ENTROPY_FORMS",
    "TeacherEntropy",
    "teacher_entropy_meter",
]

KDLossName = Literal["fkl", "rkl", "jsd", "tvd", "sfkl", "srkl"]
LOSS_NAMES: tuple[str, ...] = get_args(KDLossName)

#: Human-readable formulas, e.g. for ``--help`` texts and logs.
LOSS_FORMULAS: dict[str, str] = {
    "fkl": "-sum p log q",
    "rkl": "sum q (log q - log p)",
    "jsd": "m = b p + (1-b) q; (1-b) KL(q||m) + b KL(p||m)",
    "tvd": "0.5 sum |p - q|",
    "sfkl": "m = a p + (1-a) q; -sum p log m",
    "srkl": "m = (1-a) p + a q; sum q (log q - log m)",
}

#: Log-probabilities are floored here before any arithmetic. Without a floor, a vocabulary
#: entry that is -inf in both models (padded vocab rows) gives 0 * -inf and -inf - -inf =
#: NaN; with it those entries contribute exactly 0 (exp(floor) == 0 in float32/64) and
#: nothing overflows, while every finite log-probability of float32/64 lies far above it.
LOG_FLOOR = -1e30


class Distribution(NamedTuple):
    """A softmax distribution as the divergences read it."""

    log: Tensor  # log-probabilities, floored at LOG_FLOOR
    prob: Tensor  # probabilities


def distribution(logits: Tensor, cdtype: torch.dtype, temperature: float) -> Distribution:
    """``log_softmax(logits / T)`` (floored) and ``softmax(logits / T)`` in ``cdtype``.

    Only these logits are upcast, before dividing (fp16 logits / small T could overflow).
    One exp pass yields both: log q = x - log sum exp(x) and q = exp(x) / sum, with x the
    max-shifted logits; log_softmax followed by exp would take two.

    Example:
        >>> d = distribution(torch.tensor([[0.0, float("-inf")]]), torch.float32, 2.0)
        >>> d.prob.tolist(), d.log[0, 1].item() < -1e29  # floored, not -inf
        ([[1.0, 0.0]], True)
    """
    x = logits.to(cdtype)
    shifted = x - x.amax(dim=-1, keepdim=True)  # a new tensor: the caller's is never modified
    del x
    if temperature != 1.0:
        shifted.div_(temperature)  # max(x) / T is the max of x / T, as T > 0
    prob = shifted.exp()
    total = prob.sum(-1, keepdim=True)
    prob.div_(total)
    return Distribution(shifted.sub_(total.log_()).clamp_(min=LOG_FLOOR), prob)


_Divergence = Callable[[Distribution, Distribution, bool, float], "tuple[Tensor, Tensor | None]"]


def _softmax_chain(q: Tensor, g: Tensor) -> Tensor:
    """``q * (g - sum(q * g))``, reusing ``g``'s storage (it is a temporary)."""
    qg = g.mul_(q)
    return qg.addcmul_(q, qg.sum(-1, keepdim=True), value=-1.0)


def _fkl(q: Distribution, p: Distribution, need_grad: bool, coef: float) -> tuple[Tensor, Tensor | None]:
    value = -(p.prob * q.log).sum(-1)
    if not need_grad:
        return value, None
    # d/ds of -sum p log softmax(s) is the familiar q - p.
    return value, q.prob - p.prob


def _rkl(q: Distribution, p: Distribution, need_grad: bool, coef: float) -> tuple[Tensor, Tensor | None]:
    qr = (q.log - p.log).mul_(q.prob)
    value = qr.sum(-1)
    if not need_grad:
        return value, None
    # g = log q - log p + 1; the +1 cancels: dL/ds = q r - q * sum(q r) = q r - q L.
    return value, qr.addcmul_(q.prob, value.unsqueeze(-1), value=-1.0)


def _tvd(q: Distribution, p: Distribution, need_grad: bool, coef: float) -> tuple[Tensor, Tensor | None]:
    diff = q.prob - p.prob
    value = 0.5 * diff.abs().sum(-1)
    if not need_grad:
        return value, None
    # g = 0.5 sign(q - p); sign(0) = 0 matches autograd's subgradient of abs at 0.
    return value, _softmax_chain(q.prob, diff.sign_().mul_(0.5))


def _sfkl(q: Distribution, p: Distribution, need_grad: bool, alpha: float) -> tuple[Tensor, Tensor | None]:
    # log m = logsumexp(log a + log p, log(1-a) + log q): never log of a sum of probabilities.
    log_m = torch.logaddexp(p.log + math.log(alpha), q.log + math.log1p(-alpha))
    value = -(p.prob * log_m).sum(-1)
    if not need_grad:
        return value, None
    # g = -(1-a) p / m, with p / m = exp(log p - log m).
    g = log_m.neg_().add_(p.log).exp_().mul_(-(1.0 - alpha))
    return value, _softmax_chain(q.prob, g)


def _srkl(q: Distribution, p: Distribution, need_grad: bool, alpha: float) -> tuple[Tensor, Tensor | None]:
    log_m = torch.logaddexp(p.log + math.log1p(-alpha), q.log + math.log(alpha))
    lr = log_m.neg_().add_(q.log)  # log(q / m), in log_m's storage
    value = (q.prob * lr).sum(-1)
    if not need_grad:
        return value, None
    # g = log q + 1 - log m - a q / m; the +1 cancels.
    g = lr.exp().mul_(-alpha).add_(lr)
    return value, _softmax_chain(q.prob, g)


def _jsd(q: Distribution, p: Distribution, need_grad: bool, beta: float) -> tuple[Tensor, Tensor | None]:
    log_m = torch.logaddexp(p.log + math.log(beta), q.log + math.log1p(-beta))
    teacher_term = beta * (p.prob * (p.log - log_m)).sum(-1)
    lq = log_m.neg_().add_(q.log)  # log(q / m), in log_m's storage
    value = (1.0 - beta) * (q.prob * lq).sum(-1) + teacher_term
    if not need_grad:
        return value, None
    # The terms from d log m / dq add up to -(1-b)((1-b) q + b p) / m = -(1-b), a constant,
    # which cancels with the +1 of d(q log q)/dq: g = (1-b)(log q - log m).
    return value, _softmax_chain(q.prob, lq.mul_(1.0 - beta))


# The registry: the one place where a loss name maps to its implementation.
_DIVERGENCES: dict[str, _Divergence] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "tvd": _tvd,
    "sfkl": _sfkl,
    "srkl": _srkl,
}
assert tuple(_DIVERGENCES) == LOSS_NAMES


#: The losses whose value is a cross-entropy (``H(p)`` at agreement, not 0): their true KL is the value minus ``H(p)``.
CROSS_ENTROPY_FORMS = ("fkl", "sfkl")


class TeacherEntropy:
    """The teacher entropy ``H(p)`` summed over the tokens of every cross-entropy-form divergence computed while it is active.

    Example:
        >>> z = torch.tensor([[0.0, 1.0, 2.0]])
        >>> with teacher_entropy_meter() as meter:
        ...     value, _ = divergence("fkl", distribution(z, torch.float64, 1.0), distribution(z, torch.float64, 1.0), False, 0.1)
        >>> round(float(value[0]) - meter.mean, 12)  # the true KL of a student equal to its teacher
        0.0
    """

    def __init__(self) -> None:
        self.total: Tensor | float = 0.0  # a tensor on the loss's device: read once, at the end (no sync per chunk)
        self.tokens = 0

    def add(self, p: Distribution) -> None:
        # One dot product over (tokens, vocab): no temporary as large as the logits.
        self.total = self.total - torch.dot(p.prob.reshape(-1), p.log.reshape(-1)).detach()
        self.tokens += p.prob.shape[0] if p.prob.dim() > 1 else 1

    @property
    def mean(self) -> float:
        """Mean ``H(p)`` per token (0 when nothing was measured)."""
        return float(self.total) / self.tokens if self.tokens else 0.0


_METER: contextvars.ContextVar[TeacherEntropy | None] = contextvars.ContextVar("srd_teacher_entropy", default=None)


@contextlib.contextmanager
def teacher_entropy_meter() -> Iterator[TeacherEntropy]:
    """Measure ``H(p)`` of the fkl / sfkl divergences computed inside (every loss path calls :func:`divergence`)."""
    meter = TeacherEntropy()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def record_teacher_entropy(entropy_sum: Tensor, tokens: int) -> None:
    """Add ``H(p)`` summed over ``tokens`` of a cross-entropy-form divergence computed elsewhere (the native fkl kernel)
    to the active :func:`teacher_entropy_meter`, as :func:`divergence` does for its own.

    Example:
        >>> with teacher_entropy_meter() as meter:
        ...     record_teacher_entropy(torch.tensor(3.0), 2)
        >>> meter.mean
        1.5
    """
    meter = _METER.get()
    if meter is not None:
        meter.total = meter.total + entropy_sum.detach()
        meter.tokens += tokens


def divergence(
    loss_name: str, q: Distribution, p: Distribution, need_grad: bool, coef: float
) -> tuple[Tensor, Tensor | None]:
    """Per-token value of ``loss_name`` between student ``q`` and teacher ``p``, and dL/ds when ``need_grad``.

    ``coef`` is the mixture weight the loss uses (:func:`divergence_coef`); the gradient is
    w.r.t. the temperature-scaled student logits ``s = z_student / T``.

    Example:
        >>> q = distribution(torch.tensor([[0.0, 1.0]]), torch.float64, 1.0)
        >>> divergence("tvd", q, q, False, 0.1)
        (tensor([0.], dtype=torch.float64), None)
    """
    meter = _METER.get()
    if meter is not None and loss_name in CROSS_ENTROPY_FORMS:
        meter.add(p)
    return _DIVERGENCES[loss_name](q, p, need_grad, coef)


def divergence_coef(loss_name: str, jsd_beta: float, skew_alpha: float) -> float:
    """The mixture weight ``loss_name`` reads: ``jsd_beta`` for jsd, ``skew_alpha`` otherwise (sfkl, srkl).

    Example:
        >>> divergence_coef("jsd", 0.2, 0.3), divergence_coef("srkl", 0.2, 0.3)
        (0.2, 0.3)
    """
    return jsd_beta if loss_name == "jsd" else skew_alpha


def check_loss_name(loss_name: str) -> None:
    """Raise a ValueError naming the valid losses when ``loss_name`` is not one.

    Example:
        >>> check_loss_name("kl")
        Traceback (most recent call last):
        ValueError: unknown KD loss 'kl'; valid names: fkl, rkl, jsd, tvd, sfkl, srkl
    """
    if loss_name not in _DIVERGENCES:
        raise ValueError(f"unknown KD loss {loss_name!r}; valid names: {', '.join(LOSS_NAMES)}")


def check_divergence_settings(temperature: float, jsd_beta: float, skew_alpha: float) -> None:
    """Raise a ValueError unless T > 0 is finite and both mixture weights lie in (0, 1).

    Example:
        >>> check_divergence_settings(0.0, 0.1, 0.1)
        Traceback (most recent call last):
        ValueError: temperature must be a finite number > 0, got 0.0
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, value in (("jsd_beta", jsd_beta), ("skew_alpha", skew_alpha)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_name: KDLossName,
    temperature: float = 1.0,
    *,
    jsd_beta: float = 0.1,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Unscaled per-token divergence for ``(..., vocab)`` logits, computed in float32 or wider.

    No chunking, no T^2 factor and no gradient (runs under ``no_grad``): meant for
    analysis and logging of a few tokens; train with :func:`srd_distill.losses.kd_objective`.

    Example:
        >>> z = torch.randn(3, 7)
        >>> per_token_divergence(z, z, "tvd").tolist()
        [0.0, 0.0, 0.0]
    """
    check_loss_name(loss_name)
    check_divergence_settings(temperature, jsd_beta, skew_alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    cdtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    lead = student_logits.shape[:-1]
    with torch.no_grad():
        vocab = student_logits.shape[-1]
        q = distribution(student_logits.reshape(-1, vocab), cdtype, temperature)
        p = distribution(teacher_logits.reshape(-1, vocab), cdtype, temperature)
        value, _ = divergence(loss_name, q, p, False, divergence_coef(loss_name, jsd_beta, skew_alpha))
    return value.reshape(lead)
