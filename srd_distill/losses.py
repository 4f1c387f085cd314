"""Knowledge-distillation losses for SRD stage 2 (see ``docs/SRD-METHOD.md``, "Stage 2").

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
there. ``b`` is ``jsd_beta`` and ``a`` is ``skew_alpha`` in the functions below.

Conventions (shared by every public function here):

* ``student_logits`` and ``teacher_logits`` are ``(batch, seq, vocab)`` tensors in
  float32, bfloat16, float16 or float64 (the two may differ). They are **already aligned
  for next-token prediction**: ``logits[b, t]`` is the distribution over the token that
  ``targets[b, t]`` holds. For a causal LM run on ``input_ids`` that means
  ``logits[:, :-1]`` against ``input_ids[:, 1:]`` (see :func:`shift_for_next_token`;
  slicing gives views, which are read here without copying).
* ``mask`` is ``(batch, seq)``, bool or 0/1 numbers: 1 marks a *scored* position (a
  response token, EOS included); prompt and padding positions are 0. Logits at unscored
  positions are never read, so they cannot change the value or the gradient.
* Losses are **means over all scored tokens of the batch** (token-level mean, as in the
  reference code), not means of per-sequence means: long responses weigh more.
* Only the student receives a gradient; the teacher is treated as a constant.
* Both vocabularies must have the same size. Models with padded embedding matrices
  (e.g. a teacher with 152064 rows and a student with 151936) must be sliced to the shared
  tokenizer vocabulary first: ``logits[..., :len(tokenizer)]``.

Memory: scored positions are gathered first, so prompt and padding tokens cost nothing;
then tokens are processed ``chunk_size`` at a time, only the chunk being upcast to
float32. Value and gradient of each chunk are computed together in one pass (closed-form
gradients, below), so no autograd graph holding float32 copies of the full logits is ever
built: beyond the inputs, the extra memory is one chunk of float32 work space plus the
gradient w.r.t. the student logits in their own dtype (which autograd needs anyway).

Autograd notes: because the gradient is computed in the forward pass, call the losses
under ``torch.no_grad()`` (or on logits that do not require grad) for evaluation, which
then computes values only. One ``backward`` per forward: the gradient buffer is handed to
autograd rather than copied, so a second backward through the same graph
(``retain_graph=True``) raises a RuntimeError, and double backward is not supported.
Vocabulary entries that are ``-inf`` in both models (padded vocabularies) contribute
exactly 0; a row must have at least one finite logit.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> student = torch.randn(2, 5, 11, requires_grad=True)
    >>> teacher = torch.randn(2, 5, 11)
    >>> targets = torch.randint(0, 11, (2, 5))
    >>> mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    >>> out = kd_objective(student, teacher, targets, mask, "rkl", 2.0, 0.8)
    >>> out.loss.backward()
    >>> bool(torch.isclose(out.loss, 0.2 * out.ce_loss + 0.8 * out.kd_loss))
    True
    >>> abs(float(kd_divergence(teacher, teacher, mask, "jsd"))) < 1e-6
    True
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, get_args

import torch
from torch import Tensor

__all__ = [
    "KDLossName",
    "T2Scaling",
    "LOSS_NAMES",
    "LOSS_FORMULAS",
    "T2_SCALING_MODES",
    "REFERENCE_T2_LOSSES",
    "DEFAULT_T2_SCALING",
    "KDObjectiveOutput",
    "kd_divergence",
    "kd_objective",
    "per_token_divergence",
    "t2_factor",
    "resolve_chunk_size",
    "ChunkTerms",
    "chunk_terms",
    "shift_for_next_token",
]

KDLossName = Literal["fkl", "rkl", "jsd", "tvd", "sfkl", "srkl"]
T2Scaling = Literal["reference", "all", "none"]

LOSS_NAMES: tuple[str, ...] = get_args(KDLossName)
T2_SCALING_MODES: tuple[str, ...] = get_args(T2Scaling)

#: Human-readable formulas, e.g. for ``--help`` texts and logs.
LOSS_FORMULAS: dict[str, str] = {
    "fkl": "-sum p log q",
    "rkl": "sum q (log q - log p)",
    "jsd": "m = b p + (1-b) q; (1-b) KL(q||m) + b KL(p||m)",
    "tvd": "0.5 sum |p - q|",
    "sfkl": "m = a p + (1-a) q; -sum p log m",
    "srkl": "m = (1-a) p + a q; sum q (log q - log m)",
}

#: The losses that the authors' code multiplies by T^2 (``t2_scaling="reference"``).
REFERENCE_T2_LOSSES: frozenset[str] = frozenset({"fkl", "jsd", "srkl"})

#: ``"all"``: every loss is multiplied by T^2. Why: the gradient of a soft-target loss
#: w.r.t. the logits shrinks roughly like 1/T^2 as T grows (Hinton et al., 2015), so the
#: T^2 factor keeps the KD term's weight against the T=1 cross-entropy roughly constant
#: while the curriculum raises T from stage to stage (1 -> 1.5 -> 2), and it does so for
#: every loss alike, so losses stay comparable. The reference code applies the factor to
#: fkl, jsd and srkl only; use ``"reference"`` to reproduce the paper's numbers exactly.
#: At T = 1 (the first stage) all three modes agree.
DEFAULT_T2_SCALING: T2Scaling = "all"

# Automatic chunk size: about this many float32 elements per (chunk x vocab) work tensor;
# a handful of such tensors live at once.
# * GPUs: 2**25 (128 MiB): 2**25 / 32000 ~ 1048 tokens, 2**25 / 151936 ~ 220 tokens, large
#   enough kernels to keep the device busy; the caching allocator reuses the memory.
# * CPU: 2**20 (4 MiB). glibc returns freed heap memory to the kernel once more than a few
#   MiB are free at its top, and serves large blocks with fresh mmaps, so big work tensors
#   are page-faulted (kernel-zeroed) again on every chunk. Measured on 2 cores at vocab
#   151936 (fkl, bf16, 1200 scored tokens) system time fell from ~2 s at 27-token chunks
#   to ~0.3 s at 7; at vocab 32000 (jsd) 32-token chunks ran ~3x faster than 131-token
#   ones. Per-chunk dispatch overhead stays negligible. With MALLOC_TRIM_THRESHOLD_ and
#   MALLOC_MMAP_THRESHOLD_ raised (environment), larger explicit chunk sizes are as fast.
_AUTO_CHUNK_ELEMENTS_GPU = 1 << 25
_AUTO_CHUNK_ELEMENTS_CPU = 1 << 20
_MAX_AUTO_CHUNK_TOKENS = 4096

# Log-probabilities are floored here before any arithmetic. Without a floor, a vocabulary
# entry that is -inf in both models (padded vocab rows) gives 0 * -inf and -inf - -inf =
# NaN; with it those entries contribute exactly 0 (exp(floor) == 0 in float32/64) and
# nothing overflows, while every finite log-probability of float32/64 lies far above it.
_LOG_FLOOR = -1e30


# --------------------------------------------------------------------------------------
# Per-chunk divergences with closed-form gradients.
#
# Each takes the student's q and the teacher's p as _Dist pairs (floored log-probabilities
# and probabilities, float32 or wider, shape (chunk, vocab), temperature applied) and
# returns the per-token value (chunk,) and, if asked, dL/ds where s = z_student / T. With
# q = softmax(s) and g = dL/dq, the chain rule through the softmax gives
#     dL/ds_i = q_i * (g_i - sum_j q_j g_j),
# so any term of g that is constant across the vocabulary cancels. The functions never
# modify their inputs (the CE term may reuse the student's distribution).
# --------------------------------------------------------------------------------------


class _Dist(NamedTuple):
    log: Tensor  # log-probabilities, floored at _LOG_FLOOR
    prob: Tensor  # probabilities


_DivFn = Callable[[_Dist, _Dist, bool, float], "tuple[Tensor, Tensor | None]"]


def _softmax_chain(q: Tensor, g: Tensor) -> Tensor:
    """``q * (g - sum(q * g))``, reusing ``g``'s storage (it is a temporary)."""
    qg = g.mul_(q)
    return qg.addcmul_(q, qg.sum(-1, keepdim=True), value=-1.0)


def _fkl(q: _Dist, p: _Dist, need_grad: bool, coef: float) -> tuple[Tensor, Tensor | None]:
    value = -(p.prob * q.log).sum(-1)
    if not need_grad:
        return value, None
    # d/ds of -sum p log softmax(s) is the familiar q - p.
    return value, q.prob - p.prob


def _rkl(q: _Dist, p: _Dist, need_grad: bool, coef: float) -> tuple[Tensor, Tensor | None]:
    qr = (q.log - p.log).mul_(q.prob)
    value = qr.sum(-1)
    if not need_grad:
        return value, None
    # g = log q - log p + 1; the +1 cancels: dL/ds = q r - q * sum(q r) = q r - q L.
    return value, qr.addcmul_(q.prob, value.unsqueeze(-1), value=-1.0)


def _tvd(q: _Dist, p: _Dist, need_grad: bool, coef: float) -> tuple[Tensor, Tensor | None]:
    diff = q.prob - p.prob
    value = 0.5 * diff.abs().sum(-1)
    if not need_grad:
        return value, None
    # g = 0.5 sign(q - p); sign(0) = 0 matches autograd's subgradient of abs at 0.
    return value, _softmax_chain(q.prob, diff.sign_().mul_(0.5))


def _sfkl(q: _Dist, p: _Dist, need_grad: bool, alpha: float) -> tuple[Tensor, Tensor | None]:
    # log m = logsumexp(log a + log p, log(1-a) + log q): never log of a sum of probabilities.
    log_m = torch.logaddexp(p.log + math.log(alpha), q.log + math.log1p(-alpha))
    value = -(p.prob * log_m).sum(-1)
    if not need_grad:
        return value, None
    # g = -(1-a) p / m, with p / m = exp(log p - log m).
    g = log_m.neg_().add_(p.log).exp_().mul_(-(1.0 - alpha))
    return value, _softmax_chain(q.prob, g)


def _srkl(q: _Dist, p: _Dist, need_grad: bool, alpha: float) -> tuple[Tensor, Tensor | None]:
    log_m = torch.logaddexp(p.log + math.log1p(-alpha), q.log + math.log(alpha))
    lr = log_m.neg_().add_(q.log)  # log(q / m), in log_m's storage
    value = (q.prob * lr).sum(-1)
    if not need_grad:
        return value, None
    # g = log q + 1 - log m - a q / m; the +1 cancels.
    g = lr.exp().mul_(-alpha).add_(lr)
    return value, _softmax_chain(q.prob, g)


def _jsd(q: _Dist, p: _Dist, need_grad: bool, beta: float) -> tuple[Tensor, Tensor | None]:
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
_DIVERGENCES: dict[str, _DivFn] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "tvd": _tvd,
    "sfkl": _sfkl,
    "srkl": _srkl,
}
assert tuple(_DIVERGENCES) == LOSS_NAMES


def _coef_for(loss_name: str, jsd_beta: float, skew_alpha: float) -> float:
    return jsd_beta if loss_name == "jsd" else skew_alpha


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_loss_name(loss_name: str) -> None:
    if loss_name not in _DIVERGENCES:
        raise ValueError(f"unknown KD loss {loss_name!r}; valid names: {', '.join(LOSS_NAMES)}")


def _check_t2_scaling(t2_scaling: str) -> None:
    if t2_scaling not in T2_SCALING_MODES:
        raise ValueError(f"unknown t2_scaling {t2_scaling!r}; valid modes: {', '.join(T2_SCALING_MODES)}")


def _check_scalars(temperature: float, jsd_beta: float, skew_alpha: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, value in (("jsd_beta", jsd_beta), ("skew_alpha", skew_alpha)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Validate shapes and dtypes; return the mask as a bool tensor on the logits' device."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (batch, seq, vocab), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if student_logits.shape != teacher_logits.shape:
        hint = ""
        if student_logits.shape[:2] == teacher_logits.shape[:2]:
            hint = (
                "; the vocabularies differ: slice both to the shared tokenizer vocabulary,"
                " e.g. logits[..., :len(tokenizer)]"
            )
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same (batch, seq, vocab) shape{hint}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits ({student_logits.device}) and teacher_logits ({teacher_logits.device}) "
            "must be on the same device"
        )
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape (batch, seq), got {type(mask).__name__}")
    expected = tuple(student_logits.shape[:2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape (batch, seq) = {expected} like the logits, got {tuple(mask.shape)}")
    mask = mask.to(student_logits.device)
    if mask.dtype != torch.bool:
        if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must be bool or hold only 0 and 1 (1 = scored response token)")
        mask = mask != 0
    return mask


def _check_targets(targets: Tensor, expected: tuple[int, int], device: torch.device) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of shape (batch, seq), got {type(targets).__name__}")
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"targets must have shape (batch, seq) = {expected} like the logits (already shifted: "
            f"targets[b, t] is the token predicted by logits[b, t]), got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    return targets.to(device)


# --------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------


def t2_factor(loss_name: str, temperature: float, t2_scaling: str = DEFAULT_T2_SCALING) -> float:
    """The factor the divergence ``loss_name`` is multiplied by at ``temperature``.

    Example:
        >>> t2_factor("rkl", 2.0, "reference"), t2_factor("rkl", 2.0, "all"), t2_factor("fkl", 2.0, "none")
        (1.0, 4.0, 1.0)
    """
    _check_loss_name(loss_name)
    _check_t2_scaling(t2_scaling)
    if t2_scaling == "all" or (t2_scaling == "reference" and loss_name in REFERENCE_T2_LOSSES):
        return float(temperature) ** 2
    return 1.0


def resolve_chunk_size(
    chunk_size: int | None, vocab_size: int, device: torch.device | str | None = None
) -> int:
    """Tokens per chunk: ``chunk_size`` itself or, for ``None``, an automatic size.

    The automatic size gives work tensors of about 2**25 float32 elements (128 MiB) on
    GPUs and 2**20 (4 MiB) on the CPU (``device`` None means CPU), at most 4096 tokens;
    the comment at ``_AUTO_CHUNK_ELEMENTS_CPU`` says why the CPU size is small.

    Example:
        >>> resolve_chunk_size(None, 32000), resolve_chunk_size(None, 151936), resolve_chunk_size(512, 10)
        (32, 6, 512)
        >>> resolve_chunk_size(None, 32000, "cuda"), resolve_chunk_size(None, 151936, "cuda")
        (1048, 220)
    """
    if chunk_size is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        budget = _AUTO_CHUNK_ELEMENTS_CPU if on_cpu else _AUTO_CHUNK_ELEMENTS_GPU
        return max(1, min(_MAX_AUTO_CHUNK_TOKENS, budget // max(1, vocab_size)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    return chunk_size


def shift_for_next_token(
    student_logits: Tensor, teacher_logits: Tensor, input_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Align causal-LM outputs with their targets: position t predicts ``input_ids[:, t+1]``.

    ``response_mask[b, t]`` is 1 when ``input_ids[b, t]`` is a response token (EOS
    included); after the shift it marks the positions whose *target* is a response token.
    Returns views (no copies): ``(student[:, :-1], teacher[:, :-1], input_ids[:, 1:],
    response_mask[:, 1:])``, ready for :func:`kd_objective`.

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 2]]); resp = torch.tensor([[0, 0, 1, 1]])
        >>> s, t, y, m = shift_for_next_token(torch.zeros(1, 4, 9), torch.zeros(1, 4, 9), ids, resp)
        >>> s.shape, y.tolist(), m.tolist()
        (torch.Size([1, 3, 9]), [[6, 7, 2]], [[0, 1, 1]])
    """
    return student_logits[:, :-1], teacher_logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:]


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
    analysis and logging of a few tokens; train with :func:`kd_objective`.

    Example:
        >>> z = torch.randn(3, 7)
        >>> per_token_divergence(z, z, "tvd").tolist()
        [0.0, 0.0, 0.0]
    """
    _check_loss_name(loss_name)
    _check_scalars(temperature, jsd_beta, skew_alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    cdtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    lead = student_logits.shape[:-1]
    with torch.no_grad():
        vocab = student_logits.shape[-1]
        q = _distribution(student_logits.reshape(-1, vocab), cdtype, temperature)
        p = _distribution(teacher_logits.reshape(-1, vocab), cdtype, temperature)
        value, _ = _DIVERGENCES[loss_name](q, p, False, _coef_for(loss_name, jsd_beta, skew_alpha))
    return value.reshape(lead)


# --------------------------------------------------------------------------------------
# The chunked pass
# --------------------------------------------------------------------------------------


def _distribution(logits: Tensor, cdtype: torch.dtype, temperature: float) -> _Dist:
    """``log_softmax(logits / T)`` (floored) and ``softmax(logits / T)`` in ``cdtype``.

    Only this chunk is upcast, before dividing (fp16 logits / small T could overflow).
    One exp pass yields both: log q = x - log sum exp(x) and q = exp(x) / sum, with x the
    max-shifted logits; log_softmax followed by exp would take two.
    """
    x = logits.to(cdtype)
    shifted = x - x.amax(dim=-1, keepdim=True)  # a new tensor: the caller's is never modified
    del x
    if temperature != 1.0:
        shifted.div_(temperature)  # max(x) / T is the max of x / T, as T > 0
    prob = shifted.exp()
    total = prob.sum(-1, keepdim=True)
    prob.div_(total)
    return _Dist(shifted.sub_(total.log_()).clamp_(min=_LOG_FLOOR), prob)


class _PassResult(NamedTuple):
    ce: Tensor  # mean CE over scored tokens (0 when not computed)
    kd: Tensor  # mean divergence over scored tokens, T^2 factor applied
    grad: Tensor | None  # d(ce_weight * ce + kd_weight * kd) / d student_logits


class ChunkTerms(NamedTuple):
    """What one chunk of scored tokens contributes (see :func:`chunk_terms`)."""

    ce_sum: Tensor  # sum over the chunk's tokens of -log softmax(z)[y] (0 without targets)
    kd_sum: Tensor  # sum over the chunk's tokens of the divergence (no T^2 factor)
    grad: Tensor | None  # d(ce_weight * CE mean + kd_weight * KD mean) / d z_student, (chunk, vocab)


def chunk_terms(
    z_student: Tensor,
    z_teacher: Tensor,
    y: Tensor | None,
    *,
    cdtype: torch.dtype,
    n_scored: int,
    need_grad: bool,
    loss_name: str,
    temperature: float,
    factor: float,
    ce_weight: float,
    kd_weight: float,
    coef: float,
) -> ChunkTerms:
    """Values and logit gradient of one chunk of scored tokens: the math of every loss path.

    ``z_student`` and ``z_teacher`` are ``(chunk, vocab)`` logits (any float dtype, upcast
    here to ``cdtype``), ``y`` the ``(chunk,)`` targets or None (no CE term). The gradient
    is that of the *whole batch's* token means (``n_scored`` tokens), so chunks simply
    add up. :func:`kd_objective` (logits given) and :mod:`srd_distill.fused_head` (logits
    projected chunk by chunk from hidden states) both call this, so they cannot drift.

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
    q = _distribution(z_student, cdtype, temperature)
    value, grad_s = _DIVERGENCES[loss_name](q, _distribution(z_teacher, cdtype, temperature), want_kd_grad, coef)
    kd_sum = value.sum()
    chunk_grad = grad_s.mul_(kd_grad_scale) if grad_s is not None else None
    del grad_s
    ce_sum = torch.zeros((), dtype=cdtype, device=z_student.device)
    if y is not None:
        y = y.unsqueeze(-1)
        # CE is always at T = 1; reuse the KD distribution when T is 1 already.
        q1 = q if temperature == 1.0 else _distribution(z_student, cdtype, 1.0)
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


def _chunked_pass(
    student: Tensor,
    teacher: Tensor,
    targets: Tensor | None,
    rows: Tensor,
    cols: Tensor,
    *,
    chunk_size: int,
    need_grad: bool,
    factor: float,
    **options: object,
) -> _PassResult:
    """Value (and gradient) over the scored positions ``(rows[i], cols[i])``, chunk by chunk."""
    cdtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    n = int(rows.numel())
    inv_n = 1.0 / max(n, 1)  # an empty mask gives 0 loss and 0 gradient, not NaN
    ce_sum = torch.zeros((), dtype=cdtype, device=student.device)
    kd_sum = torch.zeros((), dtype=cdtype, device=student.device)
    grad_full = torch.zeros_like(student) if need_grad else None

    for start in range(0, n, chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        # Advanced indexing copies just this chunk, in the input dtype (also for views
        # such as logits[:, :-1], which could not be flattened without a full copy).
        terms = chunk_terms(
            student[r, c], teacher[r, c], None if targets is None else targets[r, c],
            cdtype=cdtype, n_scored=n, need_grad=need_grad, factor=factor, **options,  # type: ignore[arg-type]
        )
        kd_sum = kd_sum + terms.kd_sum
        ce_sum = ce_sum + terms.ce_sum
        if grad_full is not None and terms.grad is not None:
            grad_full[r, c] = terms.grad.to(grad_full.dtype)
        del terms

    return _PassResult(ce_sum * inv_n, kd_sum * (factor * inv_n), grad_full)


def _combine(ce_weight: float, ce: Tensor, kd_weight: float, kd: Tensor) -> Tensor:
    """``ce_weight * ce + kd_weight * kd``, leaving out zero-weight terms (0 * inf = NaN)."""
    if kd_weight == 0.0:
        return ce_weight * ce
    if ce_weight == 0.0:
        return kd_weight * kd
    return ce_weight * ce + kd_weight * kd


class _ChunkedKDFunction(torch.autograd.Function):
    """Autograd wrapper: the gradient is computed in the forward pass, chunk by chunk.

    Computing it there (instead of saving float32 activations for a backward pass) is
    what keeps memory at one chunk of float32 work space. Outputs: the weighted total
    (differentiable), the CE and KD means (for logging, not differentiable).
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, rows, cols, options):  # type: ignore[override]
        result = _chunked_pass(student, teacher, targets, rows, cols, need_grad=True, **options)
        ctx.grad_full = result.grad
        total = _combine(options["ce_weight"], result.ce, options["kd_weight"], result.kd)
        ce, kd = result.ce.clone(), result.kd.clone()
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, grad_total, grad_ce, grad_kd):  # type: ignore[override]
        grad = ctx.grad_full
        if grad is None:
            raise RuntimeError(
                "the chunked KD loss supports one backward pass per forward pass (its gradient "
                "buffer is handed to autograd, not copied); recompute the loss to differentiate again"
            )
        ctx.grad_full = None  # hand the buffer over instead of keeping a second copy alive
        # One host sync per step skips a full pass over the gradient in the usual case
        # (loss.backward() seeds 1.0); a Python float keeps the scale exact for bf16 grads.
        scale = float(grad_total)
        if scale != 1.0:
            grad.mul_(scale)
        return grad, None, None, None, None, None


def _run(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    mask: Tensor,
    *,
    loss_name: str,
    temperature: float,
    t2_scaling: str,
    ce_weight: float,
    kd_weight: float,
    chunk_size: int | None,
    jsd_beta: float,
    skew_alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    mask = _check_inputs(student_logits, teacher_logits, mask)
    rows, cols = mask.nonzero(as_tuple=True)
    if targets is not None:
        targets = _check_targets(targets, tuple(student_logits.shape[:2]), student_logits.device)
        scored = targets[rows, cols]
        vocab = student_logits.shape[-1]
        if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= vocab):
            raise ValueError(
                f"targets at scored positions (mask = 1) must be token ids in [0, {vocab}); got values in "
                f"[{int(scored.min())}, {int(scored.max())}]. Mark ignored positions with mask = 0 instead."
            )
    options = dict(
        loss_name=loss_name,
        temperature=float(temperature),
        factor=t2_factor(loss_name, temperature, t2_scaling),
        ce_weight=float(ce_weight),
        kd_weight=float(kd_weight),
        coef=_coef_for(loss_name, jsd_beta, skew_alpha),
        chunk_size=resolve_chunk_size(chunk_size, student_logits.shape[-1], student_logits.device),
    )
    teacher_logits = teacher_logits.detach()  # the teacher is a constant target
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _ChunkedKDFunction.apply(student_logits, teacher_logits, targets, rows, cols, options)
    with torch.no_grad():  # evaluation: values only, no gradient buffer
        result = _chunked_pass(student_logits, teacher_logits, targets, rows, cols, need_grad=False, **options)
    return _combine(ce_weight, result.ce, kd_weight, result.kd), result.ce, result.kd


# --------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    loss_name: KDLossName = "fkl",
    temperature: float = 1.0,
    t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    chunk_size: int | None = None,
    *,
    jsd_beta: float = 0.1,
    skew_alpha: float = 0.1,
) -> Tensor:
    """``D_T(teacher || student)``: mean over scored tokens of the per-token divergence.

    Args:
        student_logits: ``(batch, seq, vocab)``, any float dtype; receives the gradient.
        teacher_logits: ``(batch, seq, vocab)``, any float dtype; treated as constant.
        mask: ``(batch, seq)``, 1 / True at scored (response) positions.
        loss_name: one of :data:`LOSS_NAMES` (see the module docstring for the formulas).
        temperature: T > 0; both distributions are ``softmax(logits / T)``.
        t2_scaling: ``"all"`` (default, see :data:`DEFAULT_T2_SCALING`), ``"reference"``
            (T^2 for fkl, jsd, srkl only, as the authors' code) or ``"none"``.
        chunk_size: scored tokens per chunk; ``None`` picks one for the device (about
            2**25 / vocab on GPUs, 2**20 / vocab on the CPU, see :func:`resolve_chunk_size`).
        jsd_beta: teacher weight b of the jsd mixture ``m = b p + (1-b) q`` (0 < b < 1).
        skew_alpha: skew a of sfkl (``m = a p + (1-a) q``) and srkl (``m = (1-a) p + a q``).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs). With no scored token
        it is 0 (and so is its gradient).

    Example:
        >>> s = torch.randn(2, 4, 10, requires_grad=True); t = torch.randn(2, 4, 10)
        >>> loss = kd_divergence(s, t, torch.ones(2, 4), "srkl", temperature=2.0, chunk_size=3)
        >>> loss.backward(); s.grad.shape
        torch.Size([2, 4, 10])
    """
    _check_loss_name(loss_name)
    _check_t2_scaling(t2_scaling)
    _check_scalars(temperature, jsd_beta, skew_alpha)
    total, _, _ = _run(
        student_logits,
        teacher_logits,
        None,
        mask,
        loss_name=loss_name,
        temperature=temperature,
        t2_scaling=t2_scaling,
        ce_weight=0.0,
        kd_weight=1.0,
        chunk_size=chunk_size,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    return total


class KDObjectiveOutput(NamedTuple):
    """``loss`` carries the gradient; ``ce_loss`` and ``kd_loss`` are detached, for logging."""

    loss: Tensor  # (1 - kd_ratio) * ce_loss + kd_ratio * kd_loss
    ce_loss: Tensor  # mean student cross-entropy at T = 1 over scored tokens (nats)
    kd_loss: Tensor  # D_T over scored tokens, T^2 factor included as t2_scaling says


def kd_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    loss_name: KDLossName,
    temperature: float,
    kd_ratio: float,
    t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    chunk_size: int | None = None,
    *,
    jsd_beta: float = 0.1,
    skew_alpha: float = 0.1,
) -> KDObjectiveOutput:
    """The SRD stage-2 loss ``(1 - kd_ratio) * CE(student, targets) + kd_ratio * D_T``.

    Both terms are means over the scored tokens (``mask`` = 1) of the whole batch; CE is
    at T = 1, ``D_T`` is :func:`kd_divergence` at ``temperature``. Both come from one
    chunked pass over the logits, so the student's logits are read (and upcast) once.

    Args:
        student_logits, teacher_logits: ``(batch, seq, vocab)``, already shifted so that
            ``logits[b, t]`` predicts ``targets[b, t]`` (see :func:`shift_for_next_token`).
        targets: ``(batch, seq)`` integer next-token ids. Values at unscored positions are
            ignored (-100 is fine there); at scored positions they must be in ``[0, vocab)``.
        mask: ``(batch, seq)``, 1 / True at scored (response, EOS included) positions.
        loss_name, temperature, t2_scaling, chunk_size, jsd_beta, skew_alpha: as in
            :func:`kd_divergence`.
        kd_ratio: weight of the KD term, in [0, 1] (the reference stages use 0.7-1.0).

    Returns:
        :class:`KDObjectiveOutput` ``(loss, ce_loss, kd_loss)``; call ``loss.backward()``.
        Both parts are always computed, so they can be logged even at kd_ratio 0 or 1.

    Example:
        >>> s = torch.randn(1, 6, 10, requires_grad=True); t = torch.randn(1, 6, 10)
        >>> y = torch.randint(0, 10, (1, 6)); m = torch.tensor([[0, 0, 1, 1, 1, 1]])
        >>> loss, ce, kd = kd_objective(s, t, y, m, "fkl", temperature=1.5, kd_ratio=0.9)
        >>> loss.backward()
    """
    _check_loss_name(loss_name)
    _check_t2_scaling(t2_scaling)
    _check_scalars(temperature, jsd_beta, skew_alpha)
    if not (isinstance(kd_ratio, (int, float)) and 0.0 <= kd_ratio <= 1.0):
        raise ValueError(f"kd_ratio must be a number in [0, 1], got {kd_ratio!r}")
    if targets is None:
        raise ValueError("targets are required by kd_objective; use kd_divergence for the KD term alone")
    total, ce, kd = _run(
        student_logits,
        teacher_logits,
        targets,
        mask,
        loss_name=loss_name,
        temperature=temperature,
        t2_scaling=t2_scaling,
        ce_weight=1.0 - float(kd_ratio),
        kd_weight=float(kd_ratio),
        chunk_size=chunk_size,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    return KDObjectiveOutput(total, ce, kd)
