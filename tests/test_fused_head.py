"""The fused LM-head KD objective (srd_distill.fused_head) against the unfused path and a plain float64 reference.

Three ways to get the same number on tiny float64 models:

* fused: ``train.batch_objective`` with both heads fused (hidden states, heads applied per chunk);
* unfused: ``train.batch_objective`` on the models' full logits, then ``kd_objective``;
* reference: the models' logits from a plain transformers forward pass, put through the
  textbook float64 formulas of tests/test_losses.py, gradients by autograd.
"""

from __future__ import annotations

import doctest
import logging

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import srd_distill.fused_head as fused_head
import srd_distill.memory as memory
import srd_distill.progress as progress
from srd_distill.fused_head import HeadWeights, LogitPostprocess, fused_kd_objective, head_weights, plan_lm_head
from srd_distill.losses import LOSS_NAMES, shift_for_next_token
from srd_distill.data import Example, collate
from srd_distill.objective import LossSpec, batch_objective

from .test_losses import ref_ce, ref_kd

VOCAB = 61  # the shared tokenizer vocabulary
TEACHER_ROWS = 64  # a padded teacher head: rows 61-63 are never read
NO_PRECISION = torch.autocast("cpu", enabled=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation
    yield
    torch.set_num_threads(previous)


def llama(hidden: int, rows: int, seed: int, tie: bool = False, cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    config = config_cls(
        vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=hidden // 2, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )
    torch.manual_seed(seed)
    model = cls(config).double()
    with torch.no_grad():  # random weights a little larger than the init, so distributions are not near-uniform
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else None
    return model


def with_head_bias(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace the output layer by one with a bias (few architectures have one; the fused path must handle it)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(torch.randn(old.out_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    model.lm_head = head
    return model


def make_batch(seed: int, rows: int = 3, vocab: int = VOCAB):
    """Right-padded rows of different lengths with prompt and reference parts, as srd-distill builds them."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for length, prompt in ((12, 4), (9, 6), (7, 2))[:rows]:
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        examples.append(Example(ids, prompt))
    return collate(examples, pad_id=0, device=torch.device("cpu"))


def reference(student, teacher, batch, loss, temperature, kd_ratio, scaling):
    """The plain path: full logits from a transformers forward pass, textbook float64 formulas."""
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :VOCAB]
    s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :VOCAB]
    s, t, y, m = shift_for_next_token(s_logits, t_logits, batch.input_ids, batch.response_mask)
    ce, kd = ref_ce(s, y, m), ref_kd(s, t, m, loss, temperature, scaling)
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce, kd


def spec_for(student, teacher, loss, temperature, kd_ratio, scaling, fused=True):
    plans = (plan_lm_head(student, VOCAB, "student"), plan_lm_head(teacher, VOCAB, "teacher")) if fused else (None, None)
    return LossSpec(loss, temperature, kd_ratio, scaling, VOCAB, *plans)


def value_and_grads(fn, model):
    params = [p for p in model.parameters() if p.requires_grad]
    out = fn()
    grads = torch.autograd.grad(out[0], params)
    return [float(v.detach()) for v in out], grads


def assert_same(a, b, rtol=1e-9, atol=1e-12):
    (va, ga), (vb, gb) = a, b
    assert va == pytest.approx(vb, rel=rtol, abs=atol)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol * 100, atol=atol)


# ---------------------------------------------------------------------------------------
# Values and gradients: fused == unfused == reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["untied", "tied", "bias"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_fused_equals_unfused_and_the_reference(loss, head):
    student = llama(32, VOCAB, seed=1, tie=head == "tied")
    if head == "bias":
        student = with_head_bias(student, seed=5)
    teacher = llama(48, TEACHER_ROWS, seed=2)
    batch = make_batch(seed=LOSS_NAMES.index(loss))
    temperature, kd_ratio, scaling = 1.7, 0.7, "reference"

    fused_spec = spec_for(student, teacher, loss, temperature, kd_ratio, scaling)
    assert fused_spec.fused
    fused = value_and_grads(lambda: batch_objective(student, teacher, batch, fused_spec, NO_PRECISION), student)
    unfused_spec = spec_for(student, teacher, loss, temperature, kd_ratio, scaling, fused=False)
    assert not unfused_spec.fused
    unfused = value_and_grads(lambda: batch_objective(student, teacher, batch, unfused_spec, NO_PRECISION), student)
    ref = value_and_grads(lambda: reference(student, teacher, batch, loss, temperature, kd_ratio, scaling), student)

    assert_same(fused, unfused)
    assert_same(fused, ref)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    head_grad = fused[1][names.index("lm_head.weight" if head != "tied" else "model.embed_tokens.weight")]
    assert float(head_grad.abs().sum()) > 0  # the head really is trained through the fused path
    if head == "bias":
        assert float(fused[1][names.index("lm_head.bias")].abs().sum()) > 0


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_cross_entropy_part_and_kd_ratio_extremes(temperature):
    # kd_ratio 0: the loss is the plain CE (checked against torch's cross_entropy); 1: the divergence alone.
    student, teacher = llama(32, VOCAB, seed=3), llama(48, TEACHER_ROWS, seed=4)
    batch = make_batch(seed=7)
    for kd_ratio in (0.0, 1.0):
        fused = value_and_grads(
            lambda: batch_objective(student, teacher, batch, spec_for(student, teacher, "srkl", temperature, kd_ratio, "all"), NO_PRECISION),
            student,
        )
        ref = value_and_grads(lambda: reference(student, teacher, batch, "srkl", temperature, kd_ratio, "all"), student)
        assert_same(fused, ref)
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :VOCAB]
    targets = batch.input_ids[:, 1:].masked_fill(~batch.response_mask[:, 1:], -100)
    plain_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    out = batch_objective(student, teacher, batch, spec_for(student, teacher, "fkl", temperature, 0.0, "all"), NO_PRECISION)
    assert float(out.ce_loss) == pytest.approx(float(plain_ce.detach()), rel=1e-12)


@pytest.mark.parametrize(
    "kind", ["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"],
)
def test_post_processed_logits_go_through_the_fused_path(kind):
    if kind == "gemma2-softcap":
        # A cap small enough to bend the random logits, so a missing soft-cap would show.
        make = lambda hidden, rows, seed: llama(hidden, rows, seed, cls=Gemma2ForCausalLM, config_cls=Gemma2Config,
                                                final_logit_softcapping=2.0, tie=True)
    elif kind == "cohere-logit-scale":
        make = lambda hidden, rows, seed: llama(hidden, rows, seed, cls=CohereForCausalLM, config_cls=CohereConfig, logit_scale=0.3, tie=True)
    else:
        make = lambda hidden, rows, seed: llama(hidden, rows, seed, cls=GraniteForCausalLM, config_cls=GraniteConfig, logits_scaling=4.0)
    student, teacher = make(32, VOCAB, 11), make(48, TEACHER_ROWS, 12)
    spec = spec_for(student, teacher, "jsd", 2.0, 0.8, "all")
    assert spec.fused and not spec.student_head.post.identity, spec.student_head
    batch = make_batch(seed=13)
    fused = value_and_grads(lambda: batch_objective(student, teacher, batch, spec, NO_PRECISION), student)
    ref = value_and_grads(lambda: reference(student, teacher, batch, "jsd", 2.0, 0.8, "all"), student)
    assert_same(fused, ref)
    # Without its post-processing the fused head would compute another loss: the check has teeth.
    plain = LossSpec("jsd", 2.0, 0.8, "all", VOCAB, *(type(p)(True, "test", LogitPostprocess()) for p in (spec.student_head, spec.teacher_head)))
    assert abs(float(batch_objective(student, teacher, batch, plain, NO_PRECISION).loss.detach()) - fused[0][0]) > 1e-3


class DoubledLogits(LlamaForCausalLM):
    """An architecture that post-processes its logits in a way no config field announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_unknown_post_processing_falls_back_with_a_logged_reason(caplog):
    odd = llama(32, VOCAB, seed=21, cls=DoubledLogits)
    with caplog.at_level(logging.INFO, logger="srd_distill.fused_head"):
        plan = plan_lm_head(odd, VOCAB, "student")
    assert not plan.fused and "differ" in plan.reason and "post-processes" in plan.reason
    assert any("student: the KD loss uses the model's full logits" in r.getMessage() for r in caplog.records)
    # The fallback computes the model's own (doubled) logits' loss, as the reference does.
    teacher = llama(48, TEACHER_ROWS, seed=22)
    spec = LossSpec("rkl", 1.5, 0.9, "all", VOCAB, plan, plan_lm_head(teacher, VOCAB, "teacher"))
    assert not spec.fused
    batch = make_batch(seed=23)
    assert_same(
        value_and_grads(lambda: batch_objective(odd, teacher, batch, spec, NO_PRECISION), odd),
        value_and_grads(lambda: reference(odd, teacher, batch, "rkl", 1.5, 0.9, "all"), odd),
    )
    small = llama(32, 40, seed=24)
    assert "fewer than the 61 tokens" in plan_lm_head(small, VOCAB).reason


def test_gpt2_tied_head_and_padded_student_rows():
    config = GPT2Config(vocab_size=VOCAB + 3, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(31)
    student = GPT2LMHeadModel(config).double()
    teacher = llama(48, TEACHER_ROWS, seed=32)
    spec = spec_for(student, teacher, "tvd", 1.3, 0.6, "none")
    assert spec.fused
    batch = make_batch(seed=33)
    fused = value_and_grads(lambda: batch_objective(student, teacher, batch, spec, NO_PRECISION), student)
    assert_same(fused, value_and_grads(lambda: reference(student, teacher, batch, "tvd", 1.3, 0.6, "none"), student))
    # Rows beyond the shared vocabulary are never read, so they get no gradient.
    wte = dict(zip([n for n, p in student.named_parameters()], fused[1]))["transformer.wte.weight"]
    assert torch.count_nonzero(wte[VOCAB:]) == 0  # nor do their input embeddings: the batch never holds those ids
    assert float(wte[:VOCAB].abs().sum()) > 0


# ---------------------------------------------------------------------------------------
# The function itself: chunking, scaling, autograd contract, precision
# ---------------------------------------------------------------------------------------


def random_heads(seed: int, n: int = 11, hidden_s: int = 8, hidden_t: int = 12, rows: int = 23, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hidden_s, generator=g, dtype=dtype)
    w_s = torch.randn(rows, hidden_s, generator=g, dtype=dtype)
    b_s = torch.randn(rows, generator=g, dtype=dtype)
    h_t = torch.randn(n, hidden_t, generator=g, dtype=dtype)
    w_t = torch.randn(rows + 2, hidden_t, generator=g, dtype=dtype)
    y = torch.randint(0, rows - 3, (n,), generator=g)
    return h_s, w_s, b_s, h_t, w_t, y


def run_fused(h_s, w_s, b_s, h_t, w_t, y, chunk, scale=1.0, loss="sfkl", post=LogitPostprocess(), vocab=20):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h_s, w_s, b_s)]
    out = fused_kd_objective(leaves[0], HeadWeights(leaves[1], leaves[2], post), h_t, HeadWeights(w_t, None, post), y,
                             loss, 1.4, 0.75, vocab_size=vocab, chunk_size=chunk)
    (scale * out.loss).backward()
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("post", [LogitPostprocess(), LogitPostprocess(0.5, 1.5)])
def test_chunk_size_and_upstream_scale_do_not_change_the_result(post):
    inputs = random_heads(41)
    base_out, base_grads = run_fused(*inputs, chunk=1, post=post)
    for chunk in (3, 1000, None):
        out, grads = run_fused(*inputs, chunk=chunk, post=post)
        assert float(out.loss.detach()) == pytest.approx(float(base_out.loss.detach()), rel=1e-12)
        for a, b in zip(grads, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    _, scaled = run_fused(*inputs, chunk=4, scale=3.0, post=post)  # a GradScaler or a micro-batch share
    for a, b in zip(scaled, base_grads):
        torch.testing.assert_close(a, 3 * b, rtol=1e-10, atol=1e-13)
    # Head rows beyond vocab_size (padding) get exactly zero gradient.
    assert torch.count_nonzero(base_grads[1][20:]) == 0 and torch.count_nonzero(base_grads[2][20:]) == 0


def test_gradients_match_finite_differences():
    h_s, w_s, b_s, h_t, w_t, y = random_heads(42, n=3, hidden_s=3, hidden_t=4, rows=7)
    post = LogitPostprocess(0.7, 2.0)
    _, grads = run_fused(h_s, w_s, b_s, h_t, w_t, y, chunk=2, post=post, loss="jsd", vocab=5)

    def f(hs, ws, bs):
        with torch.no_grad():
            return float(fused_kd_objective(hs, HeadWeights(ws, bs, post), h_t, HeadWeights(w_t, None, post), y, "jsd", 1.4, 0.75,
                                            vocab_size=5, chunk_size=2).loss)

    eps = 1e-6
    for index, tensor in enumerate((h_s, w_s, b_s)):
        numeric = torch.zeros_like(tensor)
        for i in range(tensor.numel()):
            bump = torch.zeros_like(tensor).view(-1)
            bump[i] = eps
            args = [h_s, w_s, b_s]
            args[index] = tensor + bump.view_as(tensor)
            plus = f(*args)
            args[index] = tensor - bump.view_as(tensor)
            numeric.view(-1)[i] = (plus - f(*args)) / (2 * eps)
        torch.testing.assert_close(grads[index], numeric, rtol=1e-6, atol=1e-8)


def test_single_backward_no_grad_values_and_inference_mode_teacher():
    h_s, w_s, b_s, h_t, w_t, y = random_heads(43)
    with torch.inference_mode():
        h_t_inference = h_t * 1.0  # an inference tensor, as the teacher's forward pass produces
    leaf = h_s.clone().requires_grad_(True)
    out = fused_kd_objective(leaf, HeadWeights(w_s, b_s, LogitPostprocess()), h_t_inference, HeadWeights(w_t, None, LogitPostprocess()),
                             y, "fkl", 2.0, 0.5, vocab_size=20)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward pass"):
        out.loss.backward()
    with torch.no_grad():
        values = fused_kd_objective(leaf, HeadWeights(w_s, b_s, LogitPostprocess()), h_t, HeadWeights(w_t, None, LogitPostprocess()),
                                    y, "fkl", 2.0, 0.5, vocab_size=20)
    assert not values.loss.requires_grad
    for a, b in zip(values, out):
        assert float(a) == pytest.approx(float(b.detach()), rel=1e-12)


def test_bfloat16_autocast_matches_the_unfused_path():
    # CPU autocast stands in for the GPU's: both paths compute the heads in bfloat16, the loss in float32.
    student, teacher = llama(32, VOCAB, seed=51).float(), llama(48, TEACHER_ROWS, seed=52).float()
    batch = make_batch(seed=53)
    precision = torch.autocast("cpu", dtype=torch.bfloat16)
    fused = value_and_grads(lambda: batch_objective(student, teacher, batch, spec_for(student, teacher, "fkl", 1.5, 0.8, "all"), precision), student)
    unfused = value_and_grads(
        lambda: batch_objective(student, teacher, batch, spec_for(student, teacher, "fkl", 1.5, 0.8, "all", fused=False), precision), student
    )
    assert fused[0][0] == pytest.approx(unfused[0][0], rel=2e-3)
    for a, b in zip(fused[1], unfused[1]):
        assert a.dtype == torch.float32  # float32 master weights get float32 gradients
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()) + 1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    teacher = llama(48, TEACHER_ROWS, seed=62)
    batch = make_batch(seed=63)
    grads = []
    for checkpointing in (False, True):
        student = llama(32, VOCAB, seed=61)
        if checkpointing:
            memory.enable_gradient_checkpointing(student)
        student.train()
        grads.append(value_and_grads(
            lambda: batch_objective(student, teacher, batch, spec_for(student, teacher, "rkl", 1.5, 0.8, "all"), NO_PRECISION), student
        ))
    assert_same(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_bad_inputs_are_named():
    h_s, w_s, b_s, h_t, w_t, y = random_heads(71)
    head_s, head_t = HeadWeights(w_s, b_s, LogitPostprocess()), HeadWeights(w_t, None, LogitPostprocess())
    with pytest.raises(ValueError, match=r"student_hidden has 11 scored positions but teacher_hidden 10"):
        fused_kd_objective(h_s, head_s, h_t[:10], head_t, y, "fkl", 1.0, 0.5, vocab_size=20)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 20\)"):
        fused_kd_objective(h_s, head_s, h_t, head_t, y + 100, "fkl", 1.0, 0.5, vocab_size=20)
    with pytest.raises(ValueError, match=r"the teacher's head weight \(25, 12\) does not take hidden size 8"):
        fused_kd_objective(h_s, head_s, h_s, head_t, y, "fkl", 1.0, 0.5, vocab_size=20)
    with pytest.raises(ValueError, match="fewer than vocab_size 30"):
        fused_kd_objective(h_s, head_s, h_t, head_t, y, "fkl", 1.0, 0.5, vocab_size=30)
    with pytest.raises(ValueError, match="kd_ratio must be a number"):
        fused_kd_objective(h_s, head_s, h_t, head_t, y, "fkl", 1.0, 2.0, vocab_size=20)
    with pytest.raises(ValueError, match="unknown KD loss"):
        fused_kd_objective(h_s, head_s, h_t, head_t, y, "kl", 1.0, 0.5, vocab_size=20)


def test_head_weights_are_the_live_parameters():
    student = llama(32, VOCAB, seed=81, tie=True)
    weights = head_weights(student)
    assert weights.weight is student.model.embed_tokens.weight and weights.bias is None


def test_docstring_examples():
    for module in (fused_head, memory, progress):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ---------------------------------------------------------------------------------------
# A real pretrained model
# ---------------------------------------------------------------------------------------


def test_real_smollm2_two_steps_fused_equals_unfused(smollm2, shared_data_dir):
    """SmolLM2-135M (tied 49,152-row head) as teacher and student: two AdamW steps of batch 2, both paths."""
    import polars as pl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    rows = pl.read_parquet(shared_data_dir / "selfinst-predictions.parquet").head(4)
    examples = []
    for prompt, reference_text in zip(rows["prompt"], rows["reference"]):
        prompt_ids = tokenizer(prompt)["input_ids"][-48:]
        reference_ids = tokenizer(reference_text)["input_ids"][:32] + [tokenizer.eos_token_id]
        examples.append(Example(prompt_ids + reference_ids, len(prompt_ids)))
    teacher = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval().requires_grad_(False)
    vocab = len(tokenizer)
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
        with torch.no_grad():  # move the student off the teacher, so the KD gradient is not zero
            student.model.norm.weight.mul_(0.8)
        student.train()
        plans = (plan_lm_head(student, vocab), plan_lm_head(teacher, vocab)) if fused else (None, None)
        spec = LossSpec("fkl", 2.0, 0.9, "all", vocab, *plans)
        assert spec.fused == fused
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        losses = []
        for step in range(2):
            batch = collate(examples[2 * step : 2 * step + 2], tokenizer.pad_token_id, torch.device("cpu"))
            out = batch_objective(student, teacher, batch, spec, NO_PRECISION)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append([float(v.detach()) for v in out])
        results[fused] = (losses, student.model.norm.weight.detach().clone(), student.model.embed_tokens.weight.detach()[:50].clone())
        del student, optimizer
    (fused_losses, fused_norm, fused_embed), (plain_losses, plain_norm, plain_embed) = results[True], results[False]
    for a, b in zip(fused_losses, plain_losses):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(fused_norm, plain_norm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_embed, plain_embed, rtol=1e-4, atol=1e-6)


def test_teacher_dtype_rules(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    resolve = memory.resolve_teacher_dtype
    assert resolve("auto", torch.bfloat16, gpu, torch.bfloat16)[0] == torch.bfloat16  # its saved dtype
    assert resolve("auto", torch.float32, gpu, torch.bfloat16)[0] == torch.bfloat16  # autocast computes in bf16 anyway
    assert resolve("auto", torch.float32, gpu, torch.float32)[0] == torch.float32
    assert resolve("auto", torch.float16, cpu, torch.float32)[0] == torch.float32  # no fast float16 on CPUs
    monkeypatch.setattr(memory, "cpu_has_native_bfloat16", lambda: True)
    assert resolve("auto", torch.bfloat16, cpu, torch.float32)[0] == torch.bfloat16
    monkeypatch.setattr(memory, "cpu_has_native_bfloat16", lambda: False)
    dtype, reason = resolve("auto", torch.bfloat16, cpu, torch.float32)
    assert dtype == torch.float32 and "no native bfloat16" in reason
    assert resolve("bfloat16", torch.float32, cpu, torch.float32)[0] == torch.bfloat16  # as asked
