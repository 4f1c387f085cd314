"""srd-distill's bfloat16 step on a CPU (issue 28): grouped-matmul attention, the student head in bfloat16, float32 kept.

Bounds: on the tiny testbed models a bfloat16 step's loss stays within 1e-2 (relative) of the
float32 step's and its gradients within 6e-2 (relative norm, per matrix); the attention
function equals SDPA to float64 rounding; float32 runs never see the bfloat16 pieces.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from srd_distill.cpu_attention import grouped_attention, half_attention
from srd_distill.data import Example, collate
from srd_distill.fused_head import HeadWeights, LogitPostprocess, fused_kd_objective, plan_lm_head
from srd_distill.memory import autocast_context
from srd_distill.objective import LossSpec, batch_objective

CPU = torch.device("cpu")
VOCAB = 97


def sdpa_reference(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_grouped_attention_equals_sdpa_values_and_gradients(padding):
    g = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 9, 8
    q, k, v = (torch.randn(batch, h, length, dim, generator=g, dtype=torch.float64, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    mask = None
    keep = torch.ones(batch, length, dtype=torch.bool)  # query rows compared: those with a key to attend to
    if padding != "none":
        real = torch.ones(batch, length, dtype=torch.bool)
        if padding == "right":
            real[1, 6:] = False
        else:
            real[1, :3] = False
            keep[1, :3] = False  # no key at all: SDPA gives NaN there, ours a uniform row
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    ours = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
    ref = sdpa_reference(q, k, v, mask)
    assert ours.shape == (batch, length, heads, dim) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-10, atol=1e-12)
    weights = torch.randn(ours.shape, generator=g, dtype=torch.float64) * keep[:, :, None, None]
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((torch.nan_to_num(ref) * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_unhandled_calls_go_to_sdpa():
    # One query token against a longer cache (generation): SDPA's own function answers.
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    module.num_key_value_groups = 2  # as transformers' attention layers carry it
    out = grouped_attention(module, q, k, v, None)[0]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)).transpose(1, 2))


def test_cpu_bfloat16_precision_swaps_attention_only_inside_and_float32_never():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    half, full = autocast_context(CPU, torch.bfloat16), autocast_context(CPU, torch.float32)
    for _ in range(2):  # reusable, as the training loop enters it once per micro-batch
        with half:
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is grouped_attention
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward and not torch.is_autocast_enabled("cpu")
    with full:
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward and not torch.is_autocast_enabled("cpu")
    with half_attention(), half_attention():  # nested: the outer override comes back, then none
        pass
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def tiny_llama(hidden: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_batch():
    g = torch.Generator().manual_seed(3)
    rows = [Example(torch.randint(3, VOCAB, (n,), generator=g).tolist(), p) for n, p in ((14, 5), (11, 4), (8, 3))]
    return collate(rows, pad_id=0, device=CPU)


def objective_and_grads(student, teacher, batch, precision):
    spec = LossSpec("fkl", 2.0, 0.9, "all", VOCAB, plan_lm_head(student, VOCAB, "student"), plan_lm_head(teacher, VOCAB, "teacher"))
    student.zero_grad(set_to_none=True)
    out = batch_objective(student, teacher, batch, spec, precision)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_bfloat16_step_matches_float32_within_the_stated_bounds():
    student, teacher = tiny_llama(64, seed=1), tiny_llama(96, seed=2).eval().requires_grad_(False)
    batch = tiny_batch()
    loss32, grads32 = objective_and_grads(student, teacher, batch, autocast_context(CPU, torch.float32))
    teacher16 = tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)  # --teacher-dtype auto's bfloat16
    loss16, grads16 = objective_and_grads(student, teacher16, batch, autocast_context(CPU, torch.bfloat16))
    assert abs(loss16 - loss32) / abs(loss32) < 1e-2
    assert grads16.keys() == grads32.keys()
    for name, g32 in grads32.items():
        assert grads16[name].dtype == torch.float32  # float32 master weights
        if g32.dim() == 2:
            assert float((grads16[name] - g32).norm() / g32.norm()) < 6e-2, name


class MatmulDtypes(TorchDispatchMode):
    """Records (output shape, dtype) of every matmul the block runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append((tuple(out.shape), out.dtype, func.overloadpacket.__name__))
        return out


def test_student_head_matmuls_and_its_weight_gradient_run_in_bfloat16():
    student, teacher = tiny_llama(64, seed=1), tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)
    batch = tiny_batch()
    spec = LossSpec("fkl", 2.0, 0.9, "all", VOCAB, plan_lm_head(student, VOCAB, "student"), plan_lm_head(teacher, VOCAB, "teacher"))
    scored = int(batch.response_mask[:, 1:].sum())
    with MatmulDtypes() as record:
        batch_objective(student, teacher, batch, spec, autocast_context(CPU, torch.bfloat16)).loss.backward()
    logits = [dtype for shape, dtype, _ in record.seen if shape == (scored, VOCAB)]
    assert logits == [torch.bfloat16, torch.bfloat16]  # the teacher's head and the student's, both in bfloat16
    weight_grads = [(dtype, name) for shape, dtype, name in record.seen if shape == (VOCAB, 64)]
    # One bf16 product for the micro-batch's buffered logit gradients (fused_head.WEIGHT_GRAD_TOKENS), summed in float32
    # and rounded once, as autocast computes every other linear's weight gradient (it was a float32 addmm_ per chunk).
    assert weight_grads == [(torch.bfloat16, "mm")]
    assert any(name == "bmm" and dtype == torch.bfloat16 for _, dtype, name in record.seen)  # grouped attention ran


def test_float32_fused_head_unchanged_by_the_half_path():
    # float32 inputs: the in-place float32 addmm of the float32 logit gradient, exactly as before.
    g = torch.Generator().manual_seed(5)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = (torch.randn(VOCAB, 16, generator=g) * 0.3).requires_grad_(True)
    h_t, w_t, y = torch.randn(40, 16, generator=g), torch.randn(VOCAB, 16, generator=g), torch.randint(0, VOCAB, (40,), generator=g)
    with MatmulDtypes() as record:
        out = fused_kd_objective(h, HeadWeights(w, None, LogitPostprocess()), h_t, HeadWeights(w_t, None, LogitPostprocess()),
                                 y, "fkl", 2.0, 0.9, chunk_size=16)
        out.loss.backward()
    assert {dtype for _, dtype, _ in record.seen} == {torch.float32}
    assert [name for shape, _, name in record.seen if shape == (VOCAB, 16)] == ["addmm_"] * 3


class Casts(TorchDispatchMode):
    """Records the shape of every float32 -> bfloat16 conversion, and of every float32 elementwise op, the block runs."""

    def __init__(self):
        super().__init__()
        self.to_half: list[tuple[int, ...]] = []
        self.float_mul: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func.overloadpacket is torch.ops.aten._to_copy and src is not None and src.dtype == torch.float32 and out.dtype == torch.bfloat16:
            self.to_half.append(tuple(src.shape))
        if func.overloadpacket is torch.ops.aten.mul and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.float_mul.append(tuple(out.shape))
        return out


def student_forward_backward(student, batch, precision, forward_mode=contextlib.nullcontext()):
    from srd_distill.cpu_attention import half_block_inputs
    from srd_distill.fused_head import base_hidden_states

    with forward_mode, precision, half_block_inputs(student):
        hidden = base_hidden_states(student, batch.input_ids, batch.attention_mask)
    hidden.float().square().sum().backward()
    return hidden


def test_block_inputs_cast_once_per_block_and_rotary_runs_in_bfloat16(monkeypatch):
    from srd_distill import cpu_norm

    # The torch norms (float32 out): srdata's native RMSNorm emits bf16 itself, no cast at all (tests/test_cpu_norm.py).
    monkeypatch.setattr(cpu_norm, "_kernel_for", lambda x, weight: None)
    student, batch = tiny_llama(64, seed=1), tiny_batch()
    rows, width = batch.input_ids.shape
    record = Casts()
    student_forward_backward(student, batch, autocast_context(CPU, torch.bfloat16), forward_mode=record)
    hidden_casts = [s for s in record.to_half if s == (rows, width, 64)]
    # Per layer: the attention block's input and the MLP's, once each (autocast alone: q, k, v, gate, up = 5).
    assert len(hidden_casts) == 2 * 2
    # Rotary: no float32 product of (rows, heads, width, head_dim) (autocast alone promotes q and k to float32 there).
    assert not [s for s in record.float_mul if len(s) == 4 and s[0] == rows and s[2] == width]
    for block in student.modules():  # hooks gone afterwards
        assert not block._forward_pre_hooks


def test_block_input_casts_keep_the_bfloat16_step_close_to_float32_and_float32_unchanged():
    from srd_distill.cpu_attention import half_block_inputs

    student, batch = tiny_llama(64, seed=1), tiny_batch()
    plain = student_forward_backward(student, batch, autocast_context(CPU, torch.float32))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    with half_block_inputs(student):  # float32: nothing registered, the same numbers bit for bit
        assert not any(m._forward_pre_hooks for m in student.modules())
        again = student_forward_backward(student, batch, autocast_context(CPU, torch.float32))
    assert torch.equal(plain, again) and grads and all(torch.equal(p.grad, grads[n]) for n, p in student.named_parameters() if n in grads)
    # The bfloat16 step with the casts: loss and gradients within the file's bounds of a float64 reference.
    teacher = tiny_llama(96, seed=2).eval().requires_grad_(False)
    loss64, grads64 = objective_and_grads(student.double(), teacher.double(), batch, contextlib.nullcontext())
    teacher16 = tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)
    loss16, grads16 = objective_and_grads(student.float(), teacher16, batch, autocast_context(CPU, torch.bfloat16))
    assert abs(loss16 - loss64) / abs(loss64) < 1e-2
    for name, g64 in grads64.items():
        if g64.dim() == 2:
            assert float((grads16[name].double() - g64).norm() / g64.norm()) < 6e-2, name


FAULTS_SCRIPT = """
import ctypes, resource, sys, torch
from srd_distill.memory import keep_freed_memory
# glibc adapts its thresholds to what a process freed before (a freed mmapped block raises
# them), so whether repeated temporaries fault under the defaults depends on history: both
# arms start from glibc's initial values, fixed (128 KiB: mmap every large block, trim the heap).
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
if sys.argv[1] == "keep":
    assert keep_freed_memory(torch.device("cpu"))
def faults_of_one_step():  # the fused head's pattern: 4 chunks, each with 4 (128, 49152) float32 work tensors alive at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        work = [torch.empty(128, 49152).fill_(1.0) for _ in range(4)]
        del work
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(faults_of_one_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_repeated_large_temporaries():
    pages = 16 * 128 * 49152 * 4 // 4096
    counts = {}
    for mode in ("untuned", "keep"):
        done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        counts[mode] = int(done.stdout.split()[-1])
    assert counts["untuned"] > pages // 2, counts  # every block in fresh pages
    assert counts["keep"] < pages // 20, counts  # kept: the same pages again, whatever glibc's state before


def test_gradient_checkpointing_in_bfloat16_recomputes_layers_as_their_forward_ran():
    from srd_distill.memory import enable_gradient_checkpointing

    student, batch = tiny_llama(64, seed=1), tiny_batch()
    teacher16 = tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)
    loss, grads = objective_and_grads(student, teacher16, batch, autocast_context(CPU, torch.bfloat16))
    enable_gradient_checkpointing(student)
    student.train()
    # Before: the recompute (outside the precision context) took SDPA and per-linear casts: CheckpointError.
    loss_ckpt, grads_ckpt = objective_and_grads(student, teacher16, batch, autocast_context(CPU, torch.bfloat16))
    assert loss_ckpt == loss and all(torch.equal(grads_ckpt[n], g) for n, g in grads.items())
