"""Knowledge-distillation losses for SRD stage 2 (see ``docs/SRD-METHOD.md``, "Stage 2").

The six divergences (fkl, rkl, jsd, tvd, sfkl, srkl) and their formulas are in
:mod:`srd_distill.divergences`, which losses are multiplied by T^2 in
:mod:`srd_distill.t2_scaling`, the per-chunk math shared with the fused LM head in
:mod:`srd_distill.kd_chunks`; this module applies them to ``(batch, seq, vocab)`` logits
and re-exports the names callers use (``LOSS_NAMES``, ``t2_factor``, ``chunk_terms``, ...).

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
gradients, :mod:`srd_distill.kd_chunks`), so no autograd graph holding float32 copies of the full logits is ever
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

from typing import NamedTuple

import torch
from torch import Tensor

from srd_distill.divergences import LOSS_FORMULAS, LOSS_NAMES, KDLossName, per_token_divergence
from srd_distill.kd_chunks import MAX_AUTO_CHUNK_TOKENS, ChunkLossSettings, ChunkTerms, PassResult, check_chunk_size, chunk_terms
from srd_distill.kd_chunks import loss_with_forward_gradients, objective_settings
from srd_distill.t2_scaling import DEFAULT_T2_SCALING, REFERENCE_T2_LOSSES, T2_SCALING_MODES, T2Scaling, t2_factor

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

# Automatic chunk size: about this many float32 elements per (chunk x vocab) work tensor;
# a handful of such tensors live at once.
# * GPUs: 2**25 (128 MiB): 2**25 / 32000 ~ 1048 tokens, 2**25 / 151936 ~ 220 tokens, large
#   enough kernels to keep the device busy; the caching allocator reuses the memory.
# * CPU: 2**20 (4 MiB). glibc returns freed heap memory to the kernel once more than a few
#   MiB are free at its top, and serves large blocks with fresh mmaps, so big work tensors
#   are page-faulted (kernel-zeroed) again on every chunk; small ones stay on the heap.
#   Per-chunk dispatch overhead stays negligible. Figures: benchmarks/README.md ("KD loss").
_AUTO_CHUNK_ELEMENTS_GPU = 1 << 25
_AUTO_CHUNK_ELEMENTS_CPU = 1 << 20


# --------------------------------------------------------------------------------------
# Validation of the logits, mask and targets
# --------------------------------------------------------------------------------------


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
        return max(1, min(MAX_AUTO_CHUNK_TOKENS, budget // max(1, vocab_size)))
    return check_chunk_size(chunk_size)


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


# --------------------------------------------------------------------------------------
# The chunked pass
# --------------------------------------------------------------------------------------


def _chunked_pass(
    student: Tensor,
    teacher: Tensor,
    targets: Tensor | None,
    rows: Tensor,
    cols: Tensor,
    *,
    settings: ChunkLossSettings,
    chunk_size: int,
    need_grad: bool,
) -> PassResult:
    """Value (and student gradient) over the scored positions ``(rows[i], cols[i])``, chunk by chunk."""
    cdtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    n = int(rows.numel())
    inv_n = 1.0 / max(n, 1)  # an empty mask gives 0 loss and 0 gradient, not NaN
    ce_sum = torch.zeros((), dtype=cdtype, device=student.device)
    kd_sum = torch.zeros((), dtype=cdtype, device=student.device)
    grad_full = torch.zeros_like(student) if need_grad else None
    terms_settings = settings._asdict()

    for start in range(0, n, chunk_size):
        r, c = rows[start : start + chunk_size], cols[start : start + chunk_size]
        # Advanced indexing copies just this chunk, in the input dtype (also for views
        # such as logits[:, :-1], which could not be flattened without a full copy).
        terms = chunk_terms(
            student[r, c], teacher[r, c], None if targets is None else targets[r, c],
            cdtype=cdtype, n_scored=n, need_grad=need_grad, **terms_settings,
        )
        kd_sum = kd_sum + terms.kd_sum
        ce_sum = ce_sum + terms.ce_sum
        if grad_full is not None and terms.grad is not None:
            grad_full[r, c] = terms.grad.to(grad_full.dtype)
        del terms

    return PassResult(ce_sum * inv_n, kd_sum * (settings.factor * inv_n), (grad_full, None, None, None, None))


def _objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    mask: Tensor,
    settings: ChunkLossSettings,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, ce, kd)`` over the scored positions of ``mask``, after checking the inputs."""
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
    tokens_per_chunk = resolve_chunk_size(chunk_size, student_logits.shape[-1], student_logits.device)

    def run_pass(needs_grad: tuple[bool, ...], *inputs: Tensor) -> PassResult:
        return _chunked_pass(*inputs, settings=settings, chunk_size=tokens_per_chunk, need_grad=needs_grad[0])

    inputs = (student_logits, teacher_logits.detach(), targets, rows, cols)  # the teacher is a constant target
    return loss_with_forward_gradients(run_pass, inputs, settings, "chunked")


# --------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------


def kd_divergence(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
    loss_name: KDLossName = "fkl", temperature: float = 1.0, t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    chunk_size: int | None = None, *, jsd_beta: float = 0.1, skew_alpha: float = 0.1,
) -> Tensor:
    """``D_T(teacher || student)``: mean over scored tokens of the per-token divergence.

    Args:
        student_logits: ``(batch, seq, vocab)``, any float dtype; receives the gradient.
        teacher_logits: ``(batch, seq, vocab)``, any float dtype; treated as constant.
        mask: ``(batch, seq)``, 1 / True at scored (response) positions.
        loss_name: one of :data:`LOSS_NAMES` (formulas: :mod:`srd_distill.divergences`).
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
    settings = objective_settings(
        loss_name, temperature, t2_scaling, kd_ratio=None, jsd_beta=jsd_beta, skew_alpha=skew_alpha
    )
    total, _, _ = _objective(student_logits, teacher_logits, None, mask, settings, chunk_size)
    return total


class KDObjectiveOutput(NamedTuple):
    """``loss`` carries the gradient; ``ce_loss`` and ``kd_loss`` are detached, for logging."""

    loss: Tensor  # (1 - kd_ratio) * ce_loss + kd_ratio * kd_loss
    ce_loss: Tensor  # mean student cross-entropy at T = 1 over scored tokens (nats)
    kd_loss: Tensor  # D_T over scored tokens, T^2 factor included as t2_scaling says


def kd_objective(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor,
    loss_name: KDLossName, temperature: float, kd_ratio: float, t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    chunk_size: int | None = None, *, jsd_beta: float = 0.1, skew_alpha: float = 0.1,
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
    settings = objective_settings(
        loss_name, temperature, t2_scaling, kd_ratio=kd_ratio, jsd_beta=jsd_beta, skew_alpha=skew_alpha
    )
    if targets is None:
        raise ValueError("targets are required by kd_objective; use kd_divergence for the KD term alone")
    total, ce, kd = _objective(student_logits, teacher_logits, targets, mask, settings, chunk_size)
    return KDObjectiveOutput(total, ce, kd)
