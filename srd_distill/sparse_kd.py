"""KD from the teacher's cached top-K log-probs (``srdata teach --top-k K``): every loss, no teacher model.

At each scored position the cache holds the teacher's K most likely token ids and their
log-probs (natural logs, T = 1). The rest of the vocabulary is one number, the tail mass
``r = 1 - sum_k p_k``. Both distributions are projected onto the same K + 1 buckets (the K
ids, and "every other token"):

* teacher: ``P = (p_1, ..., p_K, r)``;
* student: ``Q = (q_{id_1}, ..., q_{id_K}, q_tail)``, where ``q_tail`` is the student's mass
  outside the K ids, computed stably as ``logsumexp(s with the K ids masked) - logsumexp(s)``
  from the student's (temperature-scaled) logits ``s``.

Each divergence of :mod:`srd_distill.divergences` (fkl, rkl, jsd, tvd, sfkl, srkl: the same
formulas and mixture weights) is then taken between ``P`` and ``Q``, with its closed-form
gradient; the gradient of the tail bucket is spread over the tail's tokens in proportion to
the student's own probabilities there (the softmax within the tail), which is the exact
derivative of the K + 1-bucket loss. The CE term on the reference is the student's own,
exact as online.

**The approximation.** The K + 1-bucket divergence never exceeds the full-vocabulary one
(all six are f-divergences, or cross-entropies that split into an entropy and one, and
merging outcomes can only shrink them): what it cannot see is how the teacher spreads ``r``
over the tail, so within the tail the student keeps its own shape and only the tail's
total is matched. With the tail small the difference is small; with K the whole vocabulary
the tail is empty and the loss, value and gradient, is online KD. Temperature: the student's
logits are divided by T as online; the teacher's K log-probs and the tail's log-mass are
divided by T alike and renormalised over the K + 1 buckets. That is exact at T = 1 (and when
r = 0); at T != 1 the full tempered tail would be ``sum_tail p_i^(1/T)`` (renormalised), which
the cache cannot give, so the tail is tempered as if it were one token. The cache's log-probs
are float16 (relative error of p_k up to ~2.4e-4): ``r`` is computed from them in float32 or
wider, clamped to [:data:`TAIL_FLOOR`, 1] (a top-K summing to 1 or above by rounding would
otherwise leave the tail no mass, and rkl an unbounded penalty on it). Teacher ids at or past
the student's vocabulary (a teacher whose output layer is padded past the tokenizer) count in
the tail.

Example:
    >>> import torch
    >>> z = torch.randn(4, 10, dtype=torch.float64)
    >>> ids = torch.arange(10).expand(4, 10)                      # K = the whole vocabulary
    >>> teacher = torch.log_softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    >>> sparse = sparse_chunk_terms(z, ids, teacher, None, cdtype=torch.float64, n_scored=4, need_grad=False,
    ...                             loss_name="rkl", temperature=2.0, factor=1.0, ce_weight=0.0, kd_weight=1.0, coef=0.1)
    >>> from srd_distill.kd_chunks import chunk_terms
    >>> online = chunk_terms(z, teacher, None, cdtype=torch.float64, n_scored=4, need_grad=False,
    ...                      loss_name="rkl", temperature=2.0, factor=1.0, ce_weight=0.0, kd_weight=1.0, coef=0.1)
    >>> bool(torch.isclose(sparse.kd_sum, online.kd_sum))
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from srd_distill.divergences import LOG_FLOOR, Distribution, KDLossName, divergence
from srd_distill.fused_head import HeadWeights, resolve_fused_chunk_size, student_head_pass
from srd_distill.kd_chunks import ChunkTerms, PassResult, loss_with_forward_gradients, objective_settings
from srd_distill.losses import KDObjectiveOutput, resolve_chunk_size
from srd_distill.t2_scaling import DEFAULT_T2_SCALING, T2Scaling

__all__ = ["TAIL_FLOOR", "bucket_distributions", "sparse_chunk_terms", "sparse_kd_objective", "fused_sparse_kd_objective"]

#: The smallest tail mass the teacher is given where its top-K leaves out some token. The
#: float16 log-probs of the cache round each p_k by up to ~2.4e-4 of itself (measured on
#: SmolLM2 at K = 64: the stored top-K mass is off by up to 2.4e-4), so a top-K that holds
#: all but 1e-6 of the mass can sum to 1 or above; a zero tail would make rkl and srkl's
#: penalty on the student's tail unbounded. The floor acts only where the float16 sum leaves
#: less than it: tails too small for the stored log-probs to measure.
TAIL_FLOOR = 1e-6


def bucket_distributions(
    s: Tensor, ids: Tensor, logprobs: Tensor, temperature: float, lse: Optional[Tensor] = None
) -> tuple[Distribution, Distribution, Tensor, Tensor, Tensor]:
    """The student's and the teacher's K + 1-bucket distributions at each position.

    ``s``: the student's temperature-scaled logits ``(tokens, vocab)`` in the compute dtype;
    ``ids``, ``logprobs``: the teacher's top-K ``(tokens, K)`` (log-probs at T = 1); ``lse``: ``logsumexp(s)``
    when the caller has it.
    Returns ``(Q, P, masked, tail_lse, valid)``: the two distributions over ``(tokens, K + 1)``
    (last bucket the tail), ``s`` with the top-K ids set to -inf, its logsumexp (0 where the
    tail is empty) and which ids lie inside the student's vocabulary.

    Example:
        >>> s = torch.tensor([[0.0, 1.0, 2.0]]); ids = torch.tensor([[2]]); lp = torch.tensor([[-0.5]])
        >>> q, p, _, _, _ = bucket_distributions(s, ids, lp, 1.0)
        >>> [round(v, 4) for v in q.prob[0].tolist()], [round(v, 4) for v in p.prob[0].tolist()]
        ([0.6652, 0.3348], [0.6065, 0.3935])
    """
    vocab = s.shape[-1]
    valid = ids < vocab  # a padded teacher's extra ids: in the tail
    at = torch.where(valid, ids, 0)
    lse = torch.logsumexp(s, -1, keepdim=True) if lse is None else lse
    s_top = s.gather(-1, at).masked_fill_(~valid, -math.inf)
    if bool(valid.all()):  # the usual case; scatter_reduce costs twice as much on CPUs
        masked = s.scatter(-1, at, -math.inf)
    else:  # the K ids masked: min(s, -inf) at valid ids, min(s, +inf) = s where an invalid id points (deterministic)
        masked = s.scatter_reduce(-1, at, torch.full_like(s_top, math.inf).masked_fill_(valid, -math.inf), "amin")
    tail_empty = valid.sum(-1, keepdim=True) >= vocab  # distinct ids covering the whole vocabulary
    tail_lse = torch.logsumexp(masked, -1, keepdim=True).masked_fill_(tail_empty, 0.0)
    log_q = torch.cat([s_top - lse, (tail_lse - lse).masked_fill_(tail_empty, -math.inf)], -1).clamp_(min=LOG_FLOOR)
    q = Distribution(log_q, log_q.exp())

    lp = logprobs.to(s.dtype).masked_fill(~valid, -math.inf)
    rest = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_(TAIL_FLOOR, 1.0).log_().masked_fill_(tail_empty, -math.inf)
    log_p = torch.cat([lp, rest], -1)
    if temperature != 1.0:
        log_p = log_p / temperature
    log_p = torch.log_softmax(log_p, -1).clamp_(min=LOG_FLOOR)  # renormalised over the K + 1 buckets
    return q, Distribution(log_p, log_p.exp()), masked, tail_lse, valid


def sparse_chunk_terms(
    z_student: Tensor, ids: Tensor, logprobs: Tensor, y: Optional[Tensor], *, cdtype: torch.dtype, n_scored: int, need_grad: bool,
    loss_name: str, temperature: float, factor: float, ce_weight: float, kd_weight: float, coef: float,
) -> ChunkTerms:
    """:func:`srd_distill.kd_chunks.chunk_terms` with the teacher given as its top-K: values and logit gradient of a chunk.

    ``z_student`` ``(chunk, vocab)`` logits, ``ids``/``logprobs`` ``(chunk, K)``, ``y`` the targets or None.
    The KD term is the divergence between the K + 1-bucket distributions (module docstring).
    """
    inv_n = 1.0 / max(n_scored, 1)
    want_kd_grad = need_grad and kd_weight != 0.0
    want_ce_grad = need_grad and y is not None and ce_weight != 0.0
    x = z_student.to(cdtype)
    s = x / temperature if temperature != 1.0 else x
    lse = torch.logsumexp(s, -1, keepdim=True)
    q, p, masked, tail_lse, valid = bucket_distributions(s, ids, logprobs, temperature, lse)
    value, grad_u = divergence(loss_name, q, p, want_kd_grad, coef)
    del q, p
    chunk_grad = None
    if grad_u is not None:
        # dL/ds: a top-K id gets its bucket's gradient; a tail token its share q_i / q_tail = exp(s_i - tail_lse)
        # of the tail bucket's (0 at the masked ids, and everywhere when the tail is empty).
        scale = kd_weight * factor * inv_n / temperature
        k = ids.shape[-1]
        chunk_grad = masked.sub_(tail_lse).exp_().mul_(grad_u[:, k:] * scale)
        chunk_grad.scatter_add_(-1, torch.where(valid, ids, 0), grad_u[:, :k].mul_(scale).masked_fill_(~valid, 0.0))
    del masked, grad_u
    ce_sum = torch.zeros((), dtype=cdtype, device=z_student.device)
    if y is not None:
        y = y.unsqueeze(-1)
        lse1 = lse if temperature == 1.0 else torch.logsumexp(x, -1, keepdim=True)
        ce_sum = (lse1 - x.gather(-1, y)).sum()
        if want_ce_grad:
            ce_grad = (x - lse1).exp_().scatter_add_(-1, y, torch.full_like(y, -1.0, dtype=cdtype))
            if chunk_grad is None:
                chunk_grad = ce_grad.mul_(ce_weight * inv_n)
            else:
                chunk_grad.add_(ce_grad, alpha=ce_weight * inv_n)
            del ce_grad
    return ChunkTerms(ce_sum, value.sum(), chunk_grad if need_grad else None)


def _check_top_k(ids: Tensor, logprobs: Tensor, n: int) -> None:
    if ids.dim() != 2 or tuple(logprobs.shape) != tuple(ids.shape) or ids.shape[0] != n:
        raise ValueError(f"top_ids and top_logprobs must both be ({n}, K), one row per scored token; got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if ids.is_floating_point() or not logprobs.is_floating_point():
        raise TypeError(f"top_ids must hold integer ids and top_logprobs floats, got {ids.dtype} and {logprobs.dtype}")


def sparse_kd_objective(
    student_logits: Tensor, top_ids: Tensor, top_logprobs: Tensor, targets: Tensor, mask: Tensor,
    loss_name: KDLossName, temperature: float, kd_ratio: float, t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    chunk_size: Optional[int] = None, *, jsd_beta: float = 0.1, skew_alpha: float = 0.1,
) -> KDObjectiveOutput:
    """:func:`srd_distill.losses.kd_objective` with the teacher given as its top-K at the scored positions.

    ``student_logits`` ``(batch, seq, vocab)`` and ``targets``, ``mask`` ``(batch, seq)`` as there
    (already shifted); ``top_ids``, ``top_logprobs``: ``(scored tokens, K)`` in the order of
    ``mask.nonzero()`` (row by row, left to right).

    Example:
        >>> s = torch.randn(1, 4, 9, requires_grad=True); y = torch.randint(0, 9, (1, 4)); m = torch.tensor([[0, 1, 1, 1]])
        >>> lp, ids = torch.log_softmax(torch.randn(3, 9), -1).topk(4, -1)
        >>> out = sparse_kd_objective(s, ids, lp, y, m, "jsd", temperature=1.0, kd_ratio=0.5)
        >>> out.loss.backward(); s.grad.shape
        torch.Size([1, 4, 9])
    """
    settings = objective_settings(loss_name, temperature, t2_scaling, kd_ratio=kd_ratio, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    rows, cols = mask.to(student_logits.device).bool().nonzero(as_tuple=True)
    n = int(rows.numel())
    _check_top_k(top_ids, top_logprobs, n)
    tokens_per_chunk = resolve_chunk_size(chunk_size, student_logits.shape[-1], student_logits.device)
    cdtype = torch.promote_types(student_logits.dtype, torch.float32)

    def run_pass(needs_grad: tuple[bool, ...], student: Tensor, ids: Tensor, lps: Tensor, y: Tensor) -> PassResult:
        ce_sum = torch.zeros((), dtype=cdtype, device=student.device)
        kd_sum = torch.zeros((), dtype=cdtype, device=student.device)
        grad = torch.zeros_like(student) if needs_grad[0] else None
        for start in range(0, n, tokens_per_chunk):
            r, c = rows[start : start + tokens_per_chunk], cols[start : start + tokens_per_chunk]
            terms = sparse_chunk_terms(student[r, c], ids[start : start + tokens_per_chunk], lps[start : start + tokens_per_chunk],
                                       y[r, c], cdtype=cdtype, n_scored=n, need_grad=needs_grad[0], **settings._asdict())
            ce_sum, kd_sum = ce_sum + terms.ce_sum, kd_sum + terms.kd_sum
            if grad is not None and terms.grad is not None:
                grad[r, c] = terms.grad.to(grad.dtype)
        inv_n = 1.0 / max(n, 1)
        return PassResult(ce_sum * inv_n, kd_sum * (settings.factor * inv_n), (grad, None, None, None))

    inputs = (student_logits, top_ids.to(student_logits.device), top_logprobs.to(student_logits.device), targets.to(student_logits.device))
    return KDObjectiveOutput(*loss_with_forward_gradients(run_pass, inputs, settings, "sparse"))


def fused_sparse_kd_objective(
    student_hidden: Tensor, student_head: HeadWeights, top_ids: Tensor, top_logprobs: Tensor, targets: Tensor,
    loss_name: KDLossName, temperature: float, kd_ratio: float, t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, *, jsd_beta: float = 0.1, skew_alpha: float = 0.1,
) -> KDObjectiveOutput:
    """:func:`sparse_kd_objective` from the student's hidden states at the scored positions (no full logits).

    The student side is :func:`srd_distill.fused_head.fused_kd_objective`'s, chunk by chunk;
    ``top_ids``/``top_logprobs`` are ``(tokens, K)``, one row per row of ``student_hidden``.

    Example:
        >>> from srd_distill.logit_postprocess import LogitPostprocess
        >>> h = torch.randn(5, 8, requires_grad=True); head = HeadWeights(torch.randn(11, 8, requires_grad=True), None, LogitPostprocess())
        >>> lp, ids = torch.log_softmax(torch.randn(5, 11), -1).topk(3, -1)
        >>> out = fused_sparse_kd_objective(h, head, ids, lp, torch.randint(0, 11, (5,)), "fkl", 1.0, 0.5)
        >>> out.loss.backward(); h.grad.shape, head.weight.grad.shape
        (torch.Size([5, 8]), torch.Size([11, 8]))
    """
    settings = objective_settings(loss_name, temperature, t2_scaling, kd_ratio=kd_ratio, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    vocab = int(vocab_size if vocab_size is not None else student_head.weight.shape[0])
    n = student_hidden.shape[0]
    _check_top_k(top_ids, top_logprobs, n)
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be ({n},), one per scored position, got {tuple(targets.shape)}")
    tokens_per_chunk = resolve_fused_chunk_size(chunk_size, vocab, student_hidden.device)
    terms_settings = settings._asdict()
    device = student_hidden.device

    def run_pass(needs_grad: tuple[bool, ...], h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], ids: Tensor, lps: Tensor,
                 y: Tensor) -> PassResult:
        def terms_of(start: int, stop: int, z_s: Tensor, cdtype: torch.dtype, need_grad: bool) -> ChunkTerms:
            return sparse_chunk_terms(z_s, ids[start:stop], lps[start:stop], y[start:stop], cdtype=cdtype, n_scored=n,
                                      need_grad=need_grad, **terms_settings)

        result = student_head_pass(h_s, w_s, b_s, post_s=student_head.post, vocab_size=vocab, chunk_size=tokens_per_chunk,
                                   settings=settings, grad_hidden=needs_grad[0], grad_head=needs_grad[1] or needs_grad[2],
                                   terms_of=terms_of)
        return PassResult(result.ce, result.kd, (*result.grads, None, None, None))

    inputs = (student_hidden, student_head.weight, student_head.bias, top_ids.to(device), top_logprobs.to(device), targets.to(device))
    return KDObjectiveOutput(*loss_with_forward_gradients(run_pass, inputs, settings, "sparse fused"))
