"""srdata's native RMSNorm kernel (kernels/rms_norm.c) behind srd_distill.cpu_norm.

Checked against float64 references and transformers' LlamaRMSNorm (forward, autograd gradients,
the bf16 teacher's result), on row counts that do not split evenly over threads; the fallbacks
(kernel disabled, hidden sizes it does not take, other dtypes); and a tiny Llama's bf16-autocast
training step with and without the kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from srd_distill import cpu_norm
from srdata.backends import native

REASON = native.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None or cpu_norm.native_kernel() is None,
                                  reason=f"srdata's native kernel cannot be built here: {REASON}")


def _norm(hidden: int, dtype=torch.float32, seed: int = 0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1)
    return norm.to(dtype)


def _float64_reference(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    xd, wd = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    out = wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    return (out, *torch.autograd.grad(out, (xd, wd), grad.double()))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_forward_and_gradients_against_float64_and_llama_autograd(threads):
    generator = torch.Generator().manual_seed(threads)
    norm = _norm(80)
    x = (torch.randn(3, 7, 80, generator=generator) * 4).requires_grad_()  # 21 rows: uneven over 2 and 3 threads
    grad = torch.randn(3, 7, 80, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = cpu_norm.NativeRMSNorm.apply(x, norm.weight, 1e-5, False)
        ox, ow = torch.autograd.grad(ours, (x, norm.weight), grad)
    finally:
        torch.set_num_threads(previous)
    exact, ex, ew = _float64_reference(x, norm.weight, grad)
    torch.testing.assert_close(ours.double(), exact, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ox.double(), ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ow.double(), ew, rtol=1e-5, atol=1e-5)
    llama = norm(x)  # transformers' own ops and autograd: float32 rounding apart
    lx, lw = torch.autograd.grad(llama, (x, norm.weight), grad)
    torch.testing.assert_close(ours, llama, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ox, lx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ow, lw, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bf16_output_is_the_cast_of_the_float32_one_and_its_gradient_reads_bf16():
    generator = torch.Generator().manual_seed(1)
    norm = _norm(64)
    x = torch.randn(5, 64, generator=generator, requires_grad=True)
    grad = torch.randn(5, 64, generator=generator).bfloat16()
    half = cpu_norm.NativeRMSNorm.apply(x, norm.weight, 1e-5, True)
    full = cpu_norm.NativeRMSNorm.apply(x, norm.weight, 1e-5, False)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.bfloat16())  # what autocast's cast would give
    hx, hw = torch.autograd.grad(half, (x, norm.weight), grad)
    fx, fw = torch.autograd.grad(full, (x, norm.weight), grad.float())
    assert hx.dtype == hw.dtype == torch.float32
    torch.testing.assert_close(hx, fx, rtol=0, atol=0)
    torch.testing.assert_close(hw, fw, rtol=0, atol=0)


@needs_kernel
def test_teacher_norm_within_one_bf16_ulp_of_llama_rms_norm():
    norm = _norm(576, torch.bfloat16, seed=2)
    x = (torch.randn(4, 33, 576, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    with torch.inference_mode():
        expected = norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), cpu_norm.teacher_rms_norms(norm):
            assert "forward" in vars(norm)
            ours = norm(x)
    assert ours.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert bool(((ours.float() - expected.float()).abs() <= ulp).all())
    assert (ours == expected).float().mean() > 0.99  # rstd differs only by the order of the sum of squares
    outside = norm(x)  # no autocast: teacher_rms_norms enters nothing
    with cpu_norm.teacher_rms_norms(norm):
        assert "forward" not in vars(norm)
    assert torch.equal(outside, expected)


@needs_kernel
def test_fallbacks_without_error_for_sizes_dtypes_and_layouts_it_does_not_take():
    for hidden, dtype in ((24, torch.float32), (64, torch.float64), (64, torch.float16)):
        norm = _norm(hidden, dtype)
        x = torch.randn(3, hidden, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), cpu_norm.fast_rms_norms(norm):
            out = norm(x)
        assert "Native" not in type(out.grad_fn).__name__
        torch.testing.assert_close(out, norm(x))
    norm = _norm(64)
    x = torch.randn(64, 6, requires_grad=True).t()  # not contiguous: made so, same result
    with cpu_norm.fast_rms_norms(norm):
        out = norm(x)
    assert "Native" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, norm(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(norm(x).sum(), x)[0], rtol=1e-5, atol=1e-5)


def test_disabled_kernel_falls_back_to_the_torch_closed_form():
    code = (
        "import torch\nfrom transformers.models.llama.modeling_llama import LlamaRMSNorm\n"
        "from srd_distill import cpu_norm\nnorm = LlamaRMSNorm(64)\nx = torch.randn(3, 64, requires_grad=True)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16), cpu_norm.fast_rms_norms(norm):\n    out = norm(x)\n"
        "assert cpu_norm.native_kernel() is None\nprint(type(out.grad_fn).__name__, torch.equal(out, norm(x)))\n"
    )
    env = {**os.environ, "SRDATA_NATIVE_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RMSNormFunctionBackward", "True"]


def _tiny_llama_step(monkeypatch, native_on: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from srd_distill.cpu_attention import half_block_inputs

    if not native_on:
        monkeypatch.setattr(cpu_norm, "_kernel_for", lambda x, weight: None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    student = LlamaForCausalLM(config)
    teacher = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    dtypes: list[torch.dtype] = []
    hook = student.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode(), cpu_norm.teacher_rms_norms(teacher):
            teacher_logits = teacher(input_ids=ids).logits.float()
        with half_block_inputs(student):
            logits = student(input_ids=ids).logits.float()
    hook.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss = loss + torch.nn.functional.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters()}, dtypes[0], teacher_logits


@needs_kernel
def test_tiny_llama_bf16_step_same_loss_and_gradients_with_and_without_the_kernel(monkeypatch):
    loss, grads, dtype, teacher = _tiny_llama_step(monkeypatch, native_on=True)
    base_loss, base_grads, base_dtype, base_teacher = _tiny_llama_step(monkeypatch, native_on=False)
    assert (dtype, base_dtype) == (torch.bfloat16, torch.float32)  # the kernel ran, its bf16 output to the block
    torch.testing.assert_close(teacher, base_teacher, rtol=2e-2, atol=2e-2)  # bf16 logits, rstd's sum order apart
    torch.testing.assert_close(loss, base_loss, rtol=1e-3, atol=1e-3)
    for name, grad in base_grads.items():
        scale = float(grad.abs().max()) + 1e-12
        assert float((grads[name] - grad).abs().max()) <= 2e-2 * scale, name  # bf16 matmuls either way


@needs_kernel
def test_decoder_norms_emit_bf16_so_no_block_input_is_cast():
    from tests.test_distill_bf16 import CPU, Casts, autocast_context, student_forward_backward, tiny_batch, tiny_llama

    student, batch = tiny_llama(64, seed=1), tiny_batch()
    record = Casts()
    student_forward_backward(student, batch, autocast_context(CPU, torch.bfloat16), forward_mode=record)
    assert not [s for s in record.to_half if s == (*batch.input_ids.shape, 64)]  # the torch norms: 2 per layer
