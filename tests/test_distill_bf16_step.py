"""srd-distill's bfloat16 step on a CPU, per optimizer step (issue 28): weight casts once per step, the CPU AdamW kernels.

The float32 path must not move: its AdamW results equal the plain loop's bit for bit, and
its micro-batches see no autocast at all.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from srd_distill.data import Example, collate, split_rows
from srd_distill.memory import autocast_context, weight_cast_scope
from srd_distill.objective import LossSpec, batch_objective
from srd_distill.fused_head import plan_lm_head
from srd_distill.step import make_optimizer, optimizer_step
from tests.test_distill_bf16 import CPU, VOCAB, tiny_llama


class OpLog(TorchDispatchMode):
    """Records every aten op the block runs, with its first argument (to tell which tensor was cast)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, object, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, args[0] if args else None, out))
        return out


def two_micro_batch_grads(student, teacher, scope):
    """One step's gradients over two micro-batches (train_stage's loop), and the float32 -> bfloat16 casts of weights."""
    g = torch.Generator().manual_seed(3)
    examples = [Example(torch.randint(3, VOCAB, (n,), generator=g).tolist(), p) for n, p in ((14, 5), (11, 4), (8, 3))]
    total = sum(e.scored_tokens for e in examples)
    spec = LossSpec("fkl", 2.0, 0.9, "all", VOCAB, plan_lm_head(student, VOCAB, "student"), plan_lm_head(teacher, VOCAB, "teacher"))
    weights = {p.data_ptr() for p in student.parameters()}
    student.zero_grad(set_to_none=True)
    precision = autocast_context(CPU, torch.bfloat16)
    with OpLog() as log, scope:
        for rows in split_rows([0, 1, 2], 2):
            part = collate([examples[i] for i in rows], pad_id=0, device=CPU)
            out = batch_objective(student, teacher, part, spec, precision)
            (out.loss * part.scored_tokens / total).backward()  # token-weighted shares, as train_stage
    casts = [a.data_ptr() for name, a, out in log.calls
             if name == "_to_copy" and isinstance(a, torch.Tensor) and a.data_ptr() in weights and out.dtype == torch.bfloat16]
    return {n: p.grad.clone() for n, p in student.named_parameters()}, casts


def test_weight_cast_scope_casts_each_weight_once_per_step_with_the_same_float32_gradients():
    student, teacher = tiny_llama(64, seed=1), tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)
    plain, plain_casts = two_micro_batch_grads(student, teacher, weight_cast_scope(CPU, torch.float32))  # a no-op scope
    held, held_casts = two_micro_batch_grads(student, teacher, weight_cast_scope(CPU, torch.bfloat16))
    # The body's linear layers (the fused head casts its own weight, outside autocast).
    linear = {p.data_ptr() for m in student.model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    assert len(linear) == 14
    assert linear <= set(plain_casts) and linear <= set(held_casts)
    assert all(plain_casts.count(w) == 2 for w in linear)  # without the scope: once per micro-batch
    assert all(held_casts.count(w) == 1 for w in linear)  # with it: once per step
    assert plain.keys() == held.keys()
    for name, grad in plain.items():  # the cached copy is the same autograd cast: float32 master gradients, bit for bit
        assert held[name].dtype == torch.float32
        assert torch.equal(held[name], grad), name


def test_weight_cast_scope_sees_the_updated_weights_at_the_next_step():
    # The cache must not outlive the step: after an optimizer update, the next step casts the new weights.
    student, teacher = tiny_llama(64, seed=1), tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)
    twin = tiny_llama(64, seed=1)
    for model in (student, twin):
        optimizer = make_optimizer(model, 1e-2, 0.0, CPU, torch.bfloat16)
        for _ in range(2):
            grads, _ = two_micro_batch_grads(model, teacher, weight_cast_scope(CPU, torch.bfloat16) if model is student
                                             else weight_cast_scope(CPU, torch.float32))
            optimizer_step(optimizer, lr=1e-2, grad_clip=0.0)
    for (name, a), b in zip(student.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_weight_cast_scope_leaves_backward_and_float32_outside_autocast():
    with weight_cast_scope(CPU, torch.bfloat16):
        assert not torch.is_autocast_enabled("cpu")  # backward passes and the code between forwards: as without it
        with autocast_context(CPU, torch.bfloat16):
            assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu")
    with weight_cast_scope(CPU, torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def adamw_run(make, steps: int = 3):
    """A few AdamW steps on fixed gradients; the parameters after them and the aten ops the steps ran."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30), torch.nn.Linear(30, 7))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    optimizer = make(model)
    g = torch.Generator().manual_seed(1)
    with OpLog() as log:
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            optimizer.step()
    return [p.detach().clone() for p in model.parameters()], {name for name, _, _ in log.calls}


def test_cpu_adamw_float32_is_foreach_and_bit_identical_to_the_loop():
    def loop(model):  # what make_optimizer gave on a CPU before: AdamW's per-tensor loop
        ref = make_optimizer(model, 1e-2, 0.1, CPU)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in ref.param_groups]
        return torch.optim.AdamW(groups, lr=1e-2, foreach=False, fused=False)

    ours, ops = adamw_run(lambda m: make_optimizer(m, 1e-2, 0.1, CPU, torch.float32))
    reference, ref_ops = adamw_run(loop)
    assert "_foreach_mul_" in ops and "_foreach_mul_" not in ref_ops and "_fused_adamw_" not in ops
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def test_cpu_adamw_bfloat16_runs_the_fused_kernel_equal_to_float32_rounding():
    ours, ops = adamw_run(lambda m: make_optimizer(m, 1e-2, 0.1, CPU, torch.bfloat16))
    reference, _ = adamw_run(lambda m: make_optimizer(m, 1e-2, 0.1, CPU, torch.float32))
    assert "_fused_adamw_" in ops
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_grouped_attention_masks_and_scales_inside_the_score_matmul():
    # The mask is a bias baddbmm adds and the scale its alpha: no elementwise pass over the scores but the softmax,
    # forward or backward (they were a third of the attention's time in a bfloat16 step).
    from srd_distill.cpu_attention import grouped_attention

    batch, heads, kv_heads, length, dim = 2, 6, 2, 9, 5
    q, k, v = (torch.randn(batch, h, length, dim, dtype=torch.bfloat16, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    real = torch.ones(batch, length, dtype=torch.bool)
    real[1, 6:] = False
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    with OpLog() as log:
        out = grouped_attention(torch.nn.Module(), q, k, v, mask)[0]
        out.float().sum().backward()
    names = [name for name, _, _ in log.calls]
    assert "baddbmm" in names and "bmm" in names
    # Elementwise passes over scores ((rows, keys): never dim, as the blocks have 2, 2, 2, 3 query rows x 3 heads
    # and 2, 4, 6, 9 keys); the backward's alpha on the query/key gradients (dim wide) is cheap and allowed.
    elementwise = [(name, tuple(out.shape)) for name, _, out in log.calls
                   if name in {"mul", "mul_", "masked_fill", "masked_fill_", "where"} and dim not in out.shape[-2:]]
    assert elementwise == [("masked_fill_", (batch, 1, 1, length, length))]  # the bias, built once from the mask


def test_grouped_attention_skips_the_keys_after_each_query_block_only_when_causal():
    from srd_distill.cpu_attention import QUERY_BLOCKS, _query_blocks, grouped_attention

    length = 16
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None, None]
    assert QUERY_BLOCKS > 1 and _query_blocks(causal, length) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    peek = causal.clone()
    peek[..., 2, 5] = True  # query 2 may see key 5: no block may be cut
    assert _query_blocks(peek, length) == [(0, length)]
    assert _query_blocks(causal[..., :2, :2], 2) == [(0, 1), (1, 2)]
    # The blocked scores: at most stop keys for a block ending at stop, never the whole square.
    q, k, v = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
    with OpLog() as log:
        ours = grouped_attention(torch.nn.Module(), q, k, v, None)[0]
    widths = [tuple(out.shape)[-1] for name, _, out in log.calls if name == "baddbmm"]
    assert widths == [4, 8, 12, 16]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(ours, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


