"""The KD objective computed from hidden states: no full-vocabulary logits tensor, ever.

A causal LM's forward pass ends with ``logits = lm_head(last_hidden_state)``, a
``(batch, seq, vocab)`` tensor per model: at batch 16 x 512 tokens and a 49k vocabulary
that is 1.6 GB in float32 for the teacher, as much for the student, and as much again for
the student's logit gradient (4.7 GB each at a 152k vocabulary). The objective only needs
the *scored* positions, and only one chunk of them at a time. So the models are run to
their last hidden states, the scored positions are gathered (``(tokens, hidden)``, small),
and :func:`fused_kd_objective` projects teacher and student through their LM heads one
chunk of tokens at a time, computes that chunk's loss and logit gradient with
:func:`srd_distill.kd_chunks.chunk_terms` (the same code as the unfused
:func:`srd_distill.losses.kd_objective`), and turns the logit gradient straight into
gradients for the student's hidden states, head weight and bias. The largest temporary is
a few ``(chunk, vocab)`` float32 tensors.

Values and gradients equal the unfused path (``kd_objective`` on ``model(...).logits``) up
to float rounding; ``tests/test_fused_head.py`` checks it in float64 for every loss.

Post-processed logits: some architectures change ``lm_head(h)`` before returning it
(Gemma 2/3 soft-cap ``cap * tanh(z / cap)``, Cohere multiplies by ``logit_scale``,
Granite divides by ``logits_scaling``). Those read from the config are applied per chunk
(:mod:`srd_distill.logit_postprocess`, with their derivative for the gradient). :func:`plan_lm_head` checks once per model,
on a short probe, that ``postprocess(lm_head(base_model(x)))`` reproduces
``model(x).logits``; when it does not (an unknown post-processing, a head that is not a
linear layer, a model without ``base_model``) the model falls back to its own logits and
the reason is logged, as ``srdata``'s scorer does.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
    >>> plan_lm_head(student, 50).fused
    True
    >>> ids = torch.randint(0, 50, (2, 6)); scored = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]).bool()
    >>> rows, cols = scored.nonzero(as_tuple=True)
    >>> h_s = student.base_model(input_ids=ids).last_hidden_state[rows, cols]
    >>> with torch.no_grad():
    ...     h_t = teacher.base_model(input_ids=ids).last_hidden_state[rows, cols]
    >>> out = fused_kd_objective(h_s, head_weights(student), h_t, head_weights(teacher), ids[:, 1:][rows, cols],
    ...                          "fkl", temperature=2.0, kd_ratio=0.8, vocab_size=50)
    >>> out.loss.backward()
    >>> student.lm_head.weight.grad.shape
    torch.Size([50, 32])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from srd_distill.divergences import KDLossName
from srd_distill.kd_chunks import MAX_AUTO_CHUNK_TOKENS, ChunkLossSettings, ChunkTerms, PassResult, check_chunk_size, chunk_terms
from srd_distill.kd_chunks import loss_with_forward_gradients, objective_settings
from srd_distill.logit_postprocess import LogitPostprocess
from srd_distill.losses import KDObjectiveOutput
from srd_distill.t2_scaling import DEFAULT_T2_SCALING, T2Scaling

__all__ = [
    "LogitPostprocess",
    "HeadPlan",
    "HeadWeights",
    "plan_lm_head",
    "head_weights",
    "fused_kd_objective",
    "resolve_fused_chunk_size",
    "student_head_pass",
]

log = logging.getLogger(__name__)

# Tokens per chunk of the fused head, automatic size. Each chunk streams both LM-head
# weight matrices three times and adds a (vocab x hidden) product into the weight
# gradient, so small chunks make that memory traffic, not arithmetic, the cost; the work
# tensors grow with chunk x vocab. CPU: 128 tokens, where the measured time levels off at
# 49k and 152k vocabularies. GPUs: about 2**26 float32 elements per tensor.
# Figures: benchmarks/README.md (bench_distill.py --cases chunks).
_FUSED_CHUNK_TOKENS_CPU = 128
#: CPU bfloat16: the head's weight gradient is one bf16 product per this many scored tokens (see student_head_pass);
#: their logit gradients are kept meanwhile, a (tokens, vocab) bf16 buffer: 100 MB at a 49k vocabulary.
WEIGHT_GRAD_TOKENS = 1024
_FUSED_CHUNK_ELEMENTS_GPU = 1 << 26


# --------------------------------------------------------------------------------------
# Per model: can the fused path be used, and with which post-processing?
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadPlan:
    """Whether a model's loss goes through the fused head, and why not when it does not."""

    fused: bool
    reason: str  # what was found: "fused LM head" or why the model's own logits are used
    post: LogitPostprocess = LogitPostprocess()


class HeadWeights(NamedTuple):
    """A model's output layer as the fused loss reads it."""

    weight: Tensor  # (rows, hidden), rows >= the shared vocabulary
    bias: Optional[Tensor]  # (rows,) or None
    post: LogitPostprocess


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def head_weights(model: torch.nn.Module, plan: Optional[HeadPlan] = None) -> HeadWeights:
    """The output layer's weight and bias (the live parameters, so updates are seen) and its post-processing.

    Example:
        >>> head_weights(model).weight.shape   # doctest: +SKIP
        torch.Size([49152, 576])
    """
    head = model.get_output_embeddings()
    post = plan.post if plan is not None else LogitPostprocess.from_config(_text_config(model))
    return HeadWeights(head.weight, getattr(head, "bias", None), post)


def base_hidden_states(model: torch.nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The last hidden state (after the final norm): what ``lm_head`` turns into logits.

    Example:
        >>> base_hidden_states(model, ids).shape   # doctest: +SKIP
        torch.Size([2, 6, 576])
    """
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def plan_lm_head(model: torch.nn.Module, vocab_size: int, role: str = "model") -> HeadPlan:
    """Check once whether ``model``'s logits can be computed chunk by chunk from its hidden states.

    Runs the model on an 8-token probe both ways and compares; any difference beyond
    float rounding (an unknown post-processing) or any error (an unusual layout) gives a
    plan with ``fused=False`` and the reason, which is also logged.

    Example:
        >>> plan = plan_lm_head(model, len(tokenizer), "student")   # doctest: +SKIP
        >>> plan.fused, plan.reason                                  # doctest: +SKIP
        (True, 'fused LM head')
    """
    def refuse(reason: str) -> HeadPlan:
        log.info("%s: the KD loss uses the model's full logits: %s", role, reason)
        return HeadPlan(False, reason)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return refuse("it has no linear output layer (get_output_embeddings)")
    if not isinstance(head, torch.nn.Linear):
        return refuse(f"its output layer is a {type(head).__name__}, not a torch.nn.Linear")
    if weight.shape[0] < vocab_size:
        return refuse(f"its output layer has {weight.shape[0]} rows, fewer than the {vocab_size} tokens")
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return refuse("it has no separate base model (model.base_model) to read hidden states from")
    post = LogitPostprocess.from_config(_text_config(model))
    ids = (torch.arange(1, 9, device=weight.device) % vocab_size)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits[..., :vocab_size].double()
            hidden = base_hidden_states(model, ids)
            got = post.apply_(torch.nn.functional.linear(hidden, weight, head.bias).double())[..., :vocab_size]
    except Exception as err:  # an unusual model layout: the generic path works for every causal LM
        return refuse(f"computing lm_head(base_model(x)) failed ({type(err).__name__}: {err})")
    finally:
        model.train(was_training)
    if got.shape != expected.shape:
        return refuse(f"lm_head(base_model(x)) has shape {tuple(got.shape)}, the model's logits {tuple(expected.shape)}")
    # float32 agrees to ~1e-6 relative; bfloat16/float16 models round their logits to ~1e-2.
    half = weight.dtype in (torch.bfloat16, torch.float16) or hidden.dtype in (torch.bfloat16, torch.float16)
    tolerance = (3e-2 if half else 1e-4) * max(1.0, float(expected.abs().max()))
    difference = float((got - expected).abs().max())
    if not math.isfinite(difference) or difference > tolerance:
        known = "" if post.identity else f" (after the post-processing read from its config: {post.describe()})"
        return refuse(
            f"its logits differ from lm_head(last hidden state){known} by up to {difference:.3g}: it post-processes "
            "its logits in a way the fused head does not reproduce"
        )
    reason = "fused LM head" + ("" if post.identity else f" ({post.describe()})")
    log.info("%s: %s", role, reason)
    return HeadPlan(True, reason, post)


# --------------------------------------------------------------------------------------
# The fused pass
# --------------------------------------------------------------------------------------


def resolve_fused_chunk_size(chunk_size: Optional[int], vocab_size: int, device: torch.device | str | None = None) -> int:
    """Scored tokens per chunk of the fused head: ``chunk_size`` or, for ``None``, an automatic size.

    Automatic: 128 tokens on the CPU; on GPUs about 2**26 float32 elements per
    ``(chunk, vocab)`` tensor, at most 4096 tokens.

    Example:
        >>> resolve_fused_chunk_size(None, 151936), resolve_fused_chunk_size(None, 151936, "cuda"), resolve_fused_chunk_size(8, 10)
        (128, 441, 8)
    """
    if chunk_size is None:
        if device is None or torch.device(device).type == "cpu":
            return _FUSED_CHUNK_TOKENS_CPU
        return max(1, min(MAX_AUTO_CHUNK_TOKENS, _FUSED_CHUNK_ELEMENTS_GPU // max(1, vocab_size)))
    return check_chunk_size(chunk_size)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here: the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device_type)  # autocast casts float32/16 inputs of linear, never float64
    return torch.promote_types(hidden.dtype, weight.dtype)


#: ``terms_of(start, stop, z_student, cdtype, need_grad)``: the chunk's :class:`~srd_distill.kd_chunks.ChunkTerms`
#: from the student's post-processed logits of scored tokens ``start:stop`` (the teacher side is the caller's).
ChunkTermsOf = Callable[[int, int, Tensor, torch.dtype, bool], ChunkTerms]


def student_head_pass(
    h_s: Tensor,
    w_s: Tensor,
    b_s: Optional[Tensor],
    *,
    post_s: LogitPostprocess,
    vocab_size: int,
    chunk_size: int,
    settings: ChunkLossSettings,
    grad_hidden: bool,
    grad_head: bool,
    terms_of: ChunkTermsOf,
    teacher_dtype: torch.dtype = torch.float32,
) -> PassResult:
    """The student's side of a fused pass: project a chunk of hidden states, ask ``terms_of`` for its loss terms and
    logit gradient, turn that into gradients of the hidden states, head weight and bias; chunk after chunk.

    ``teacher_dtype`` is the dtype of the teacher's logits, which with the student's decides the compute dtype.
    Returns the pass's means and the gradients of ``(h_s, w_s, b_s)``. The online teacher (:func:`fused_kd_objective`)
    and the cached top-K teacher (:mod:`srd_distill.sparse_kd`) both run through it.
    """
    n = h_s.shape[0]
    inv_n = 1.0 / max(n, 1)
    need_grad = grad_hidden or grad_head
    mm_s = _matmul_dtype(h_s, w_s)
    with torch.autocast(h_s.device.type, enabled=False):  # dtypes are chosen explicitly below
        # The head sliced to the shared vocabulary (padded rows are never read) and cast once
        # to the matmul dtype (no copy when it is its own already).
        ws = w_s[:vocab_size].to(mm_s)
        bs = b_s[:vocab_size].to(mm_s) if b_s is not None else None
        hs = h_s.to(mm_s)
        # Half matmuls (autocast): the weight gradient is a float32 in-place addmm of the float32
        # logit gradient and hidden states per chunk (no bfloat16 rounding of each chunk's product,
        # and no (vocab, hidden) temporary per chunk, whose conversion and add cost more than the
        # product). On a CPU in bfloat16 that float32 product ran at half the bf16 matmuls' speed
        # (~0.3 s of a 1,000-token SmolLM2 micro-batch): there the logit gradients of up to
        # WEIGHT_GRAD_TOKENS tokens are kept in bf16 and multiplied at once, a bf16 product summed in
        # float32 and rounded once to bf16, as autocast computes every other linear layer's weight gradient.
        acc_dtype = torch.promote_types(w_s.dtype, torch.float32)
        half_weight_grad = grad_head and mm_s == torch.bfloat16 and h_s.device.type == "cpu"
        dz_buffer = (torch.empty((min(n, chunk_size * max(1, WEIGHT_GRAD_TOKENS // chunk_size)), vocab_size), dtype=mm_s,
                                 device=h_s.device) if half_weight_grad and n else None)
        buffered_from = 0  # the first token whose logit gradient is in dz_buffer
        h_acc = h_s.to(acc_dtype) if grad_head and mm_s != acc_dtype and not half_weight_grad else hs
        cdtype = torch.promote_types(torch.promote_types(mm_s, teacher_dtype), torch.float32)
        ce_sum = torch.zeros((), dtype=cdtype, device=h_s.device)
        kd_sum = torch.zeros((), dtype=cdtype, device=h_s.device)
        g_h = torch.empty_like(h_s) if grad_hidden else None
        g_w = torch.zeros((vocab_size, w_s.shape[1]), dtype=acc_dtype, device=w_s.device) if grad_head else None
        g_b = torch.zeros((vocab_size,), dtype=acc_dtype, device=w_s.device) if grad_head and b_s is not None else None

        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            x_s = hs[start:stop]
            z_s = torch.nn.functional.linear(x_s, ws, bs)
            if not post_s.identity:  # else terms_of upcasts (bfloat16 logits may go to the native kernel as they are)
                z_s = post_s.apply_(z_s.to(cdtype))
            terms = terms_of(start, stop, z_s, cdtype, need_grad)
            ce_sum += terms.ce_sum
            kd_sum += terms.kd_sum
            if terms.grad is not None:
                dz_c = post_s.chain_(terms.grad, z_s)  # d loss / d raw head output, (chunk, vocab), in cdtype
                dz = terms.grad_bf16 if terms.grad_bf16 is not None and mm_s == torch.bfloat16 and post_s.identity else dz_c.to(mm_s)
                if g_h is not None:
                    g_h[start:stop] = (dz @ ws).to(g_h.dtype)
                if g_w is not None and dz_buffer is not None:
                    dz_buffer[start - buffered_from : stop - buffered_from] = dz
                    if stop - buffered_from == dz_buffer.shape[0] or stop == n:
                        g_w.add_(dz_buffer[: stop - buffered_from].t() @ hs[buffered_from:stop])  # bf16 product, float32 sum
                        buffered_from = stop
                elif g_w is not None:
                    if dz.dtype == acc_dtype:
                        g_w.addmm_(dz.t(), x_s)  # in place: no (vocab, hidden) temporary per chunk
                    elif dz_c.dtype == acc_dtype and h_acc.dtype == acc_dtype:  # half matmuls: see h_acc
                        g_w.addmm_(dz_c.t(), h_acc[start:stop])
                    else:
                        g_w += (dz.t() @ x_s).to(acc_dtype)
                if g_b is not None:
                    g_b += dz.sum(0, dtype=acc_dtype)
                del dz, dz_c
            del terms, z_s

    grad_weight = grad_bias = None
    if g_w is not None:
        grad_weight = g_w.to(w_s.dtype) if vocab_size == w_s.shape[0] else _pad_rows(g_w, w_s)
    if g_b is not None and b_s is not None:
        grad_bias = g_b.to(b_s.dtype) if vocab_size == b_s.shape[0] else _pad_rows(g_b, b_s)
    return PassResult(ce_sum * inv_n, kd_sum * (settings.factor * inv_n), (g_h, grad_weight, grad_bias))


def _fused_pass(
    h_s: Tensor,
    w_s: Tensor,
    b_s: Optional[Tensor],
    h_t: Tensor,
    w_t: Tensor,
    b_t: Optional[Tensor],
    targets: Tensor,
    *,
    post_s: LogitPostprocess,
    post_t: LogitPostprocess,
    vocab_size: int,
    chunk_size: int,
    settings: ChunkLossSettings,
    grad_hidden: bool,
    grad_head: bool,
) -> PassResult:
    """Values and the gradients of the student's hidden states, head weight and bias, chunk by chunk."""
    n = h_s.shape[0]
    terms_settings = settings._asdict()
    mm_t = _matmul_dtype(h_t, w_t)
    with torch.autocast(h_s.device.type, enabled=False):
        wt = w_t[:vocab_size].to(mm_t)
        bt = b_t[:vocab_size].to(mm_t) if b_t is not None else None
        ht = h_t.to(mm_t)

    def teacher_terms(start: int, stop: int, z_s: Tensor, cdtype: torch.dtype, need_grad: bool) -> ChunkTerms:
        z_t = torch.nn.functional.linear(ht[start:stop], wt, bt)
        if not post_t.identity:
            z_t = post_t.apply_(z_t.to(cdtype))
        return chunk_terms(z_s, z_t, targets[start:stop], cdtype=cdtype, n_scored=n, need_grad=need_grad, **terms_settings)

    result = student_head_pass(h_s, w_s, b_s, post_s=post_s, vocab_size=vocab_size, chunk_size=chunk_size, settings=settings,
                               grad_hidden=grad_hidden, grad_head=grad_head, terms_of=teacher_terms, teacher_dtype=mm_t)
    return PassResult(result.ce, result.kd, (*result.grads, None, None, None, None))  # one per input: only the student's


def _pad_rows(grad: Tensor, like: Tensor) -> Tensor:
    """A gradient for the whole (padded) head: zero for the rows beyond the shared vocabulary."""
    full = torch.zeros_like(like)
    full[: grad.shape[0]] = grad.to(like.dtype)
    return full


def _check_fused_inputs(h_s: Tensor, head_s: HeadWeights, h_t: Tensor, head_t: HeadWeights, targets: Tensor, vocab: int) -> Tensor:
    for name, h, head in (("student", h_s, head_s), ("teacher", h_t, head_t)):
        if not isinstance(h, Tensor) or h.dim() != 2 or not h.is_floating_point():
            raise ValueError(f"{name}_hidden must be a float (tokens, hidden) tensor of the scored positions, got "
                             f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
        if head.weight.dim() != 2 or head.weight.shape[1] != h.shape[1]:
            raise ValueError(f"the {name}'s head weight {tuple(head.weight.shape)} does not take hidden size {h.shape[1]}")
        if head.weight.shape[0] < vocab:
            raise ValueError(f"the {name}'s head has {head.weight.shape[0]} rows, fewer than vocab_size {vocab}")
    if h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"student_hidden has {h_s.shape[0]} scored positions but teacher_hidden {h_t.shape[0]}")
    if h_s.device != h_t.device or head_s.weight.device != h_s.device or head_t.weight.device != h_t.device:
        raise ValueError("hidden states and head weights of both models must be on one device")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (h_s.shape[0],):
        raise ValueError(f"targets must be a ({h_s.shape[0]},) tensor of token ids, one per scored position, got "
                         f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    targets = targets.to(h_s.device)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab}); got values in [{int(targets.min())}, {int(targets.max())}]")
    return targets


def fused_kd_objective(
    student_hidden: Tensor, student_head: HeadWeights, teacher_hidden: Tensor, teacher_head: HeadWeights, targets: Tensor,
    loss_name: KDLossName, temperature: float, kd_ratio: float, t2_scaling: T2Scaling = DEFAULT_T2_SCALING,
    vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, *, jsd_beta: float = 0.1, skew_alpha: float = 0.1,
) -> KDObjectiveOutput:
    """:func:`srd_distill.losses.kd_objective` from the hidden states of the scored positions.

    Args:
        student_hidden: ``(tokens, hidden_s)``: the student's last hidden state at each
            position whose *next* token is scored (receives a gradient).
        student_head: :func:`head_weights` of the student (its weight, and bias, receive
            gradients; tied input embeddings get theirs added by autograd).
        teacher_hidden, teacher_head: the same for the teacher (no gradient; may be
            inference-mode tensors).
        targets: ``(tokens,)`` the scored token ids, in ``[0, vocab_size)``.
        vocab_size: the shared tokenizer size; heads with more (padded) rows are sliced.
            Default: the student head's rows.
        chunk_size: scored tokens per chunk (default: :func:`resolve_fused_chunk_size`).
        loss_name, temperature, kd_ratio, t2_scaling, jsd_beta, skew_alpha: as in
            :func:`srd_distill.losses.kd_objective`.

    Returns:
        ``KDObjectiveOutput(loss, ce_loss, kd_loss)``: means over the tokens, as ``kd_objective``.

    Example:
        >>> h = torch.randn(5, 8, requires_grad=True); head = HeadWeights(torch.randn(11, 8, requires_grad=True), None, LogitPostprocess())
        >>> teacher = HeadWeights(torch.randn(11, 8), None, LogitPostprocess())
        >>> out = fused_kd_objective(h, head, torch.randn(5, 8), teacher, torch.randint(0, 11, (5,)), "jsd", 1.0, 0.5)
        >>> out.loss.backward(); h.grad.shape, head.weight.grad.shape
        (torch.Size([5, 8]), torch.Size([11, 8]))
    """
    settings = objective_settings(
        loss_name, temperature, t2_scaling, kd_ratio=kd_ratio, jsd_beta=jsd_beta, skew_alpha=skew_alpha
    )
    vocab = int(vocab_size if vocab_size is not None else student_head.weight.shape[0])
    targets = _check_fused_inputs(student_hidden, student_head, teacher_hidden, teacher_head, targets, vocab)
    tokens_per_chunk = resolve_fused_chunk_size(chunk_size, vocab, student_hidden.device)

    def run_pass(needs_grad: tuple[bool, ...], *inputs: Optional[Tensor]) -> PassResult:
        return _fused_pass(
            *inputs, post_s=student_head.post, post_t=teacher_head.post, vocab_size=vocab,  # type: ignore[arg-type]
            chunk_size=tokens_per_chunk, settings=settings, grad_hidden=needs_grad[0],
            grad_head=needs_grad[1] or needs_grad[2],
        )

    w_t, b_t = teacher_head.weight.detach(), teacher_head.bias.detach() if teacher_head.bias is not None else None
    inputs = (student_hidden, student_head.weight, student_head.bias, teacher_hidden.detach(), w_t, b_t, targets)
    return KDObjectiveOutput(*loss_with_forward_gradients(run_pass, inputs, settings, "fused"))
