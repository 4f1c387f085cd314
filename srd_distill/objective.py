"""The loss of one batch and the held-out evaluation of ``srd-distill``.

* :func:`batch_objective`: ``(1 - kd_ratio) * CE(student, reference) + kd_ratio *
  D_T(teacher || student)`` on one padded batch, from full logits or (fused LM head)
  from the last hidden states a chunk of positions at a time. The teacher is a model, or
  its cached top-K carried by the batch (``--teacher-logits``, :mod:`srd_distill.sparse_kd`).
* :func:`evaluate`: the same objective on the eval file (token-weighted means) and the
  mean ROUGE-L of the student's greedy answers. With cached teacher logits the eval rows
  have no teacher: only the student's CE (``kd_loss`` and ``loss`` are None).

Example:
    >>> spec = LossSpec("fkl", temperature=1.0, kd_ratio=0.8, t2_scaling="none", vocab_size=512)   # doctest: +SKIP
    >>> batch_objective(student, teacher, collate(examples, 0, device), spec, nullcontext()).loss   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from srd_distill.cpu_attention import half_block_inputs
from srd_distill.cpu_mlp import swiglu_mlps
from srd_distill.cpu_norm import teacher_rms_norms
from srd_distill.data import Batch, EncodedData, collate
from srd_distill.fused_head import (
    HeadPlan,
    base_hidden_states,
    fused_kd_objective,
    head_weights,
)
from srd_distill.losses import kd_objective, shift_for_next_token

__all__ = ["LossSpec", "batch_objective", "evaluate"]


@dataclass(frozen=True)
class LossSpec:
    """Which divergence, at which temperature and mix, and how: everything the objective needs."""

    loss: str
    temperature: float
    kd_ratio: float
    t2_scaling: str
    vocab_size: int  # the shared tokenizer size; padded output rows are sliced off
    student_head: Optional[HeadPlan] = None  # both fused: the loss is computed from hidden states
    teacher_head: Optional[HeadPlan] = None
    sparse: bool = False  # the teacher is its cached top-K (--teacher-logits): only the student's head matters

    @property
    def fused(self) -> bool:
        student = bool(self.student_head and self.student_head.fused)
        return student and (self.sparse or bool(self.teacher_head and self.teacher_head.fused))

    @property
    def source(self) -> str:
        """How the loss is computed, in words, for the stage banner."""
        if self.sparse:
            how = ("the student's hidden states (fused LM head)" if self.fused else "the student's full logits" +
                   (f": {self.student_head.reason}" if self.student_head else " (--no-fused-head)"))
            return f"KD from the cached teacher top-K (K + 1 buckets), no teacher loaded; loss from {how}"
        if self.fused:
            return "loss from hidden states (fused LM head)"
        if self.teacher_head is None:
            return "loss from full logits (--no-fused-head)"
        reason = next(h.reason for h in (self.teacher_head, self.student_head) if h is not None and not h.fused)
        return f"loss from full logits: {reason}"


def batch_objective(
    student: torch.nn.Module, teacher: Optional[torch.nn.Module], batch: Batch, spec: LossSpec,
    precision: contextlib.AbstractContextManager,
) -> Any:
    """``(1 - kd_ratio) * CE + kd_ratio * D_T`` on one batch; returns ``kd_objective``'s output.

    Fused (the default where both models allow it, see :mod:`srd_distill.fused_head`): the
    models stop at their last hidden states and the LM heads are applied a chunk of scored
    positions at a time inside the loss. Otherwise: full logits, then the chunked loss.
    ``teacher`` None: the batch carries the teacher's cached top-K (or, without it, an empty
    top-K: the KD term is 0 and only the CE is meaningful).
    """
    ids, attention = batch.input_ids, batch.attention_mask
    args = (spec.loss, spec.temperature, spec.kd_ratio, spec.t2_scaling)
    if teacher is None:
        return _sparse_objective(student, batch, spec, precision)
    if spec.fused:
        rows, cols = batch.response_mask[:, 1:].nonzero(as_tuple=True)  # hidden state t predicts token t + 1
        with torch.inference_mode(), precision, teacher_rms_norms(teacher), swiglu_mlps(teacher):  # a fixed target: no graph, no gradient
            teacher_hidden = base_hidden_states(teacher, ids, attention)[rows, cols]
        with precision:
            with half_block_inputs(student), swiglu_mlps(student):  # CPU bfloat16: one cast per block input, not per linear
                student_hidden = base_hidden_states(student, ids, attention)[rows, cols]
            # Under autocast the heads' matmuls run in its dtype too (softmax and sums stay float32):
            # a float32 student head was ~15% of a bfloat16 step on CPU.
            return fused_kd_objective(student_hidden, head_weights(student, spec.student_head), teacher_hidden,
                                      head_weights(teacher, spec.teacher_head), ids[:, 1:][rows, cols], *args, vocab_size=spec.vocab_size)  # type: ignore[arg-type]
    with torch.inference_mode(), precision, teacher_rms_norms(teacher), swiglu_mlps(teacher):
        teacher_logits = teacher(input_ids=ids, attention_mask=attention, use_cache=False).logits
    with precision, half_block_inputs(student), swiglu_mlps(student):
        student_logits = student(input_ids=ids, attention_mask=attention, use_cache=False).logits
    vocab = spec.vocab_size
    s, t, targets, mask = shift_for_next_token(student_logits[..., :vocab], teacher_logits[..., :vocab], ids, batch.response_mask)
    return kd_objective(s, t, targets, mask, *args)  # type: ignore[arg-type]


def _sparse_objective(student: torch.nn.Module, batch: Batch, spec: LossSpec, precision: contextlib.AbstractContextManager) -> Any:
    """The objective with the teacher's cached top-K (:mod:`srd_distill.sparse_kd`)."""
    from srd_distill.sparse_kd import fused_sparse_kd_objective, sparse_kd_objective

    ids, attention = batch.input_ids, batch.attention_mask
    args = (spec.loss, spec.temperature, spec.kd_ratio, spec.t2_scaling)
    top_ids, top_logprobs = batch.top_ids, batch.top_logprobs
    if top_ids is None or top_logprobs is None:  # rows without a cached teacher (the eval file): K = 0
        top_ids = torch.zeros((batch.scored_tokens, 0), dtype=torch.long, device=ids.device)
        top_logprobs = torch.zeros((batch.scored_tokens, 0), device=ids.device)
    if spec.fused:
        rows, cols = batch.response_mask[:, 1:].nonzero(as_tuple=True)
        with precision:  # the head's matmuls in the autocast dtype too, as the online teacher's path
            with half_block_inputs(student):
                student_hidden = base_hidden_states(student, ids, attention)[rows, cols]
            return fused_sparse_kd_objective(student_hidden, head_weights(student, spec.student_head), top_ids, top_logprobs,
                                             ids[:, 1:][rows, cols], *args, vocab_size=spec.vocab_size)  # type: ignore[arg-type]
    with precision, half_block_inputs(student):
        student_logits = student(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return sparse_kd_objective(student_logits[:, :-1, : spec.vocab_size], top_ids, top_logprobs, ids[:, 1:],
                               batch.response_mask[:, 1:], *args)  # type: ignore[arg-type]



def evaluate(
    student: torch.nn.Module,
    teacher: Optional[torch.nn.Module],
    tokenizer: Any,
    data: EncodedData,
    spec: LossSpec,
    *,
    batch_size: int,
    max_new_tokens: int,
    rouge_tokenizer: str,
    pad_id: int,
    device: torch.device,
    precision: contextlib.AbstractContextManager,
) -> dict[str, Any]:
    """Held-out objective (token-weighted means) and mean ROUGE-L of greedy answers.

    Generation goes through srdata's HF backend (greedy, stops at end-of-sequence), the
    code that produced the student outputs of ``srdata score``; ROUGE-L is
    :func:`srdata.rouge_l`, identical to ``rouge-score`` with stemming.
    """
    from srdata.backends.base import GenerationParams
    from srdata.backends.hf import HFBackend
    from srdata.steps.rouge import rouge_l
    from srdata.steps.tokenize import resolve_eos_id

    student.eval()
    sums = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(data.examples), batch_size):
            batch = collate(data.examples[start : start + batch_size], pad_id, device)
            out = batch_objective(student, teacher, batch, spec, precision)
            for key, value in zip(("loss", "ce_loss", "kd_loss"), out):
                sums[key] += float(value) * batch.scored_tokens
            tokens += batch.scored_tokens
        backend = HFBackend(student, tokenizer, batch_size=batch_size)
        params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=(resolve_eos_id(tokenizer),))
        with precision:
            answers = backend.generate(data.prompt_ids, params)
    scores = rouge_l([a.text for a in answers], data.references, tokenizer=rouge_tokenizer)  # type: ignore[arg-type]
    student.train()
    result: dict[str, Any] = {key: value / max(tokens, 1) for key, value in sums.items()}
    if teacher is None:  # no teacher for the eval rows (cached logits cover the training rows only)
        result["loss"] = result["kd_loss"] = None
    result["eval_rouge_l"] = sum(scores) / len(scores)
    return result
