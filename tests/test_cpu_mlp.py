"""srd_distill.cpu_mlp: the native SwiGLU kernel against float64 and torch's bf16 ops, its installer, a bf16 step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from srd_distill.cpu_mlp import SwiGLUFunction, _launch, reference, swiglu, swiglu_kernel, swiglu_mlps
from srd_distill.memory import autocast_context
from srdata.backends import native
from tests.test_distill_bf16 import CPU, objective_and_grads, tiny_batch, tiny_llama

REASON = native.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"srdata's native kernel cannot be built here: {REASON}")
ULP = 2.0 ** -7  # a bf16 ulp relative to the value's binade (8 significant bits)


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((4 * torch.randn(n, generator=g)).bfloat16() for _ in range(3))


def _torch_bf16(gate, up, grad):
    """torch's own bf16 ops, as LlamaMLP runs them: (h, d_gate, d_up)."""
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = torch.nn.functional.silu(gate) * up
    h.backward(grad)
    return h.detach(), gate.grad, up.grad


@needs_kernel
@pytest.mark.parametrize("n,threads", [(1, 1), (15, 2), (17, 1), (1000, 2), (4099, 2), (4096, 1)])
def test_kernel_within_half_a_bf16_ulp_of_float64_and_one_of_torch(n, threads):
    gate, up, grad = _inputs(n, seed=n)
    h = _launch(swiglu_kernel(), gate, up, threads=threads)[0]
    d_gate, d_up = _launch(swiglu_kernel(), gate, up, grad, threads=threads)
    got = (h, d_gate, d_up)
    for mine, exact, theirs in zip(got, reference(gate, up, grad), _torch_bf16(gate, up, grad)):
        scale = exact.abs().max()
        # Rounded once from float32 math: half an ulp of the exact value (plus float32's ~1e-6 in the slope's cancellation).
        assert ((mine.double() - exact).abs() <= ULP / 2 * exact.abs() + 1e-5 * scale).all()
        # torch rounds twice (silu(g) or dh * u, then the product): within one ulp of it.
        assert ((mine.double() - theirs.double()).abs() <= ULP * exact.abs() + 1e-5 * scale).all()
        assert float((mine.double() - exact).abs().max()) <= float((theirs.double() - exact).abs().max()) + 1e-5 * float(scale)


@needs_kernel
def test_threads_give_the_same_bits_and_a_tail_is_not_written_past():
    gate, up, grad = _inputs(1000 + 7, seed=5)
    one = _launch(swiglu_kernel(), gate, up, grad, threads=1)
    two = _launch(swiglu_kernel(), gate, up, grad, threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    buffer = torch.full((40,), 7.0, dtype=torch.bfloat16)
    swiglu_kernel()(0, gate.data_ptr(), up.data_ptr(), None, buffer.data_ptr(), None, 21, 2)
    assert torch.equal(buffer[21:], torch.full((19,), 7.0, dtype=torch.bfloat16))  # the masked tail left alone
    assert torch.equal(buffer[:21], _launch(swiglu_kernel(), gate[:21], up[:21])[0])


@needs_kernel
def test_autograd_function_on_3d_inputs():
    gate, up, grad = (t.reshape(3, 5, 7) for t in _inputs(105, seed=2))
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = SwiGLUFunction.apply(g, u)
    h.backward(grad)
    exact = reference(gate, up, grad)
    for got, want in zip((h.detach(), g.grad, u.grad), exact):
        assert got.shape == (3, 5, 7) and got.dtype == torch.bfloat16
        assert ((got.double() - want).abs() <= ULP / 2 * want.abs() + 1e-5 * want.abs().max()).all()


def test_other_dtypes_devices_fall_back():
    assert swiglu(torch.randn(4, 16), torch.randn(4, 16)) is None
    assert swiglu(torch.randn(4, 16).bfloat16(), torch.randn(4, 8).bfloat16()) is None
    assert swiglu(torch.randn(0, 16).bfloat16(), torch.randn(0, 16).bfloat16()) is None


def test_disabled_kernel_falls_back_to_torch():
    code = ("import torch; from srd_distill.cpu_mlp import swiglu, swiglu_kernel; "
            "assert swiglu_kernel() is None; assert swiglu(torch.ones(32).bfloat16(), torch.ones(32).bfloat16()) is None; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "SRDATA_NATIVE_KERNELS": "0"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_installer_only_under_cpu_bf16_autocast_and_removes_itself():
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=40))
    with swiglu_mlps(mlp):  # float32: never touched
        assert "forward" not in vars(mlp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with swiglu_mlps(mlp):
            assert "forward" in vars(mlp)
            x = torch.randn(2, 3, 16)
            out = mlp(x)
        assert "forward" not in vars(mlp)
        want = mlp(x)
    assert out.dtype == want.dtype == torch.bfloat16
    assert float((out.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-2
    other = LlamaMLP(LlamaConfig(hidden_size=16, num_attention_heads=2, intermediate_size=40, hidden_act="gelu"))
    with torch.autocast("cpu", dtype=torch.bfloat16), swiglu_mlps(other):
        assert "forward" not in vars(other)  # not SiLU: the model's own code


@needs_kernel
def test_tiny_llama_bf16_step_with_and_without_the_kernel():
    batch = tiny_batch()
    teacher = tiny_llama(96, seed=2).to(torch.bfloat16).eval().requires_grad_(False)
    precision = autocast_context(CPU, torch.bfloat16)
    calls = []
    original = SwiGLUFunction.forward

    def counting(ctx, gate, up):
        calls.append(gate.shape)
        return original(ctx, gate, up)

    student = tiny_llama(64, seed=1)
    SwiGLUFunction.forward = staticmethod(counting)
    try:
        loss_k, grads_k = objective_and_grads(student, teacher, batch, precision)
    finally:
        SwiGLUFunction.forward = staticmethod(original)
    assert len(calls) == 2  # the student's two layers ran the kernel
    assert all("forward" not in vars(m) for m in [*student.modules(), *teacher.modules()])
    from srd_distill import objective

    saved = objective.swiglu_mlps
    objective.swiglu_mlps = lambda model: __import__("contextlib").nullcontext()  # the tree without the kernel
    try:
        loss_t, grads_t = objective_and_grads(student, teacher, batch, precision)
    finally:
        objective.swiglu_mlps = saved
    assert abs(loss_k - loss_t) / abs(loss_t) < 2e-3
    assert grads_k.keys() == grads_t.keys()
    for name, g in grads_t.items():
        assert float((grads_k[name] - g).norm() / g.norm().clamp_min(1e-12)) < 2e-2, name
