"""srdata's native decode-step attention kernel (srdata/backends/native.py, kernels/decode_attention.c).

Checked against a float64 reference and torch's own kernel on random caches of the shapes
it takes (head dims 64 and 128, 1-7 query heads per KV head, left padding, empty columns,
holes, strided caches, 1 and 2 threads), then end to end on the real SmolLM2 in bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srdata.backends import decode_attention_kernel, native

REASON = native.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"srdata's native kernel cannot be built here: {REASON}")


def _case(rows: int, kv_heads: int, groups: int, dim: int, keys: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = (torch.randn(rows, kv_heads, groups, dim, generator=generator) * 2).to(torch.bfloat16)
    k = torch.randn(rows, kv_heads, keys, dim, generator=generator).to(torch.bfloat16)
    v = torch.randn(rows, kv_heads, keys, dim, generator=generator).to(torch.bfloat16)
    mask = torch.zeros(rows, 1, 1, keys, dtype=torch.bool)
    for row in range(rows):  # left padding of every length, empty room on the right, a hole in odd rows
        mask[row, ..., (row * 11) % (keys - 8) : keys - 5] = True
        if row % 2:
            mask[row, ..., keys - 9] = False
    return q, k, v, mask


def _exact(q, k, v, mask, scale):
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v.double()


def _error(out, exact) -> float:
    return float((out.double() - exact).abs().max() / exact.abs().max())


@needs_kernel
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("groups", [1, 3, 7])
def test_kernel_matches_float64_as_closely_as_torchs_kernel(dim, groups):
    q, k, v, mask = _case(rows=9, kv_heads=2, groups=groups, dim=dim, keys=70, seed=dim + groups)
    exact = _exact(q, k, v, mask, dim**-0.5)
    flash = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=dim**-0.5)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = native.decode_attention(q, k, v, mask, dim**-0.5)
        assert out is not None and out.dtype == torch.bfloat16 and out.shape == q.shape
        assert _error(out, exact) <= max(1.25 * _error(flash, exact), 2e-3)
        # Per element: within one bfloat16 rounding of the exact value (plus float32 sums' noise)
        assert bool(((out.double() - exact).abs() <= exact.abs() * 2**-8 + 2e-3 * exact.abs().max()).all())


@needs_kernel
def test_kernel_never_reads_columns_a_row_cannot_see():
    q, k, v, mask = _case(rows=6, kv_heads=3, groups=3, dim=64, keys=50, seed=1)
    expected = native.decode_attention(q, k, v, mask, 0.125)
    hidden = ~mask.reshape(6, 1, 50, 1).expand(6, 3, 50, 64)
    poisoned_k, poisoned_v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("inf"))
    got = native.decode_attention(q, poisoned_k, poisoned_v, mask, 0.125)
    assert got is not None and torch.equal(got, expected)


@needs_kernel
def test_kernel_reads_strided_caches_and_no_mask():
    q, k, v, mask = _case(rows=12, kv_heads=3, groups=3, dim=64, keys=90, seed=2)
    part_q, part_k, part_v, part_mask = q[4:9], k[4:9, :, 10:88], v[4:9, :, 10:88], mask[4:9, ..., 10:88]
    assert not part_k.is_contiguous()
    out = native.decode_attention(part_q, part_k, part_v, part_mask, 0.125)
    assert _error(out, _exact(part_q, part_k, part_v, part_mask, 0.125)) < 4e-3
    everything = native.decode_attention(q, k, v, None, 0.125)
    assert _error(everything, _exact(q, k, v, torch.ones_like(mask), 0.125)) < 4e-3


@needs_kernel
def test_kernel_leaves_what_it_does_not_take_to_torch():
    q, k, v, mask = _case(rows=4, kv_heads=2, groups=3, dim=64, keys=30, seed=3)
    blind = mask.clone()
    blind[2] = False  # a row that sees no key: torch decides what that means
    assert native.decode_attention(q, k, v, blind, 0.125) is None
    assert native.decode_attention(q.float(), k.float(), v.float(), mask, 0.125) is None  # float32: torch's kernel
    assert native.decode_attention(q.half(), k.half(), v.half(), mask, 0.125) is None
    q96, k96, v96, mask96 = _case(rows=4, kv_heads=2, groups=3, dim=96, keys=30, seed=4)
    assert native.decode_attention(q96, k96, v96, mask96, 96**-0.5) is None  # head dims 64 and 128 only
    assert native.decode_attention(q, k, v, mask.float(), 0.125) is None  # additive float masks: torch


def test_a_cpu_without_avx512_bf16_or_a_compiler_keeps_torchs_kernel(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)  # another CPU, as torch reports it
    assert "AVX512-BF16" in native.unavailable_reason()
    native.kernel.cache_clear()
    try:
        assert native.kernel() is None
        assert decode_attention_kernel("hf", "cpu", "bfloat16") == "torch"
        q, k, v, mask = _case(rows=2, kv_heads=1, groups=3, dim=64, keys=20, seed=5)
        assert native.decode_attention(q, k, v, mask, 0.125) is None
    finally:
        native.kernel.cache_clear()
    empty = Path(os.devnull).parent  # no compiler in an empty PATH
    env = {**os.environ, "PATH": str(empty / "no-such-folder"), "CC": ""}
    code = "from srdata.backends import native; print(native.unavailable_reason())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "no C compiler" in done.stdout or "lacks" in done.stdout
    env = {**os.environ, "SRDATA_NATIVE_KERNELS": "0"}
    code = "import torch; from srdata.backends import native; print(native.name('cpu', torch.bfloat16))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "torch"


@needs_kernel
def test_kernel_is_built_once_per_source_and_concurrent_builds_end_complete(tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    fresh = tmp_path / "fresh"
    code = f"from srdata.backends import native; print(native.build({str(fresh)!r}))"
    builds = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {build.communicate(timeout=120)[0].strip() for build in builds}
    assert all(build.returncode == 0 for build in builds)
    assert len(paths) == 1 and sorted(p.name for p in fresh.iterdir()) == [Path(paths.pop()).name]


@needs_kernel
def test_a_kernel_that_fails_to_build_or_check_is_not_used(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "decode_attention.c"
    broken.write_text("int srdata_decode_attention_bf16( {\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="decode_attention.c"):
        native.build(tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # the failed build's temp file is gone
    monkeypatch.undo()
    monkeypatch.setattr(native, "check_error", lambda function: 0.5)  # e.g. a miscompiled kernel
    native.kernel.cache_clear()
    try:
        with caplog.at_level("INFO", logger="srdata.backends.native"):
            assert native.kernel() is None
        assert "load check failed" in caplog.text
        assert any(r.levelname == "WARNING" and "load check failed" in r.getMessage() for r in caplog.records)  # not hidden at INFO
    finally:
        native.kernel.cache_clear()


@needs_kernel
def test_real_model_bfloat16_decode_runs_on_the_kernel_and_answers_as_torchs(smollm2, monkeypatch):
    from srdata.backends import GenerationParams
    from srdata.backends.hf import HFBackend

    backend = HFBackend.from_pretrained(smollm2, device="cpu", dtype="bfloat16", batch_size=8)
    tok = backend.tokenizer
    prompts = ["The capital of France is", "Write one sentence about the sea.", "2 + 2 =", "List three colors:",
               "Translate 'good morning' into Spanish:", "Why is the sky blue? Answer briefly.", "Name a prime number:", "Hello, my name is"]
    ids = [tok(p)["input_ids"] for p in prompts]
    params = GenerationParams(max_new_tokens=12, stop_token_ids=(tok.eos_token_id,))
    calls = []
    real = native.decode_attention
    monkeypatch.setattr("srdata.backends.attention.decode_attention", lambda *a: calls.append(1) or real(*a))
    with_kernel = backend.generate(ids, params)
    assert len(calls) % 30 == 0 and len(calls) >= 30 * 5  # every layer (30) of every decode step
    monkeypatch.setattr("srdata.backends.attention.decode_attention", lambda *a: None)
    with_torch = backend.generate(ids, params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(with_kernel, with_torch))
    assert same >= 6, [(a.text, b.text) for a, b in zip(with_kernel, with_torch)]  # bf16 roundings differ: near-ties may flip


def test_each_ray_replica_records_the_kernel_its_decode_attention_runs_on(tiny_llama):
    from types import SimpleNamespace

    from srdata.engines.replica import describe_here

    for dtype in ("bfloat16", "float32"):
        config = SimpleNamespace(model=SimpleNamespace(device="cpu", backend="hf", dtype=dtype, path=str(tiny_llama)))
        record = describe_here(config)
        assert record["dtype"] == dtype
        assert record["decode_attention"] == ("srdata-avx512-bf16" if dtype == "bfloat16" and REASON is None else "torch")


@needs_kernel
def test_kernel_on_a_long_cache_and_many_query_heads_per_kv_head():
    q, k, v, mask = _case(rows=3, kv_heads=2, groups=12, dim=128, keys=2600, seed=6)  # 24 heads over 2 KV heads
    out = native.decode_attention(q, k, v, mask, 128**-0.5)
    exact = _exact(q, k, v, mask, 128**-0.5)
    flash = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=128**-0.5)
    assert out is not None and _error(out, exact) <= max(1.25 * _error(flash, exact), 2e-3)


@needs_kernel
def test_an_unwritable_kernel_cache_warns_with_the_setting_to_change(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "SRDATA_KERNEL_CACHE": str(blocker / "kernels")}
    code = "import torch; from srdata.backends import native; print(native.name('cpu', torch.bfloat16))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "torch"  # torch's kernel runs: the scores are still computed
    assert "SRDATA_KERNEL_CACHE to a writable folder" in done.stderr, done.stderr  # a warning, shown without logging setup
    assert blocker.read_text() == "not a folder"  # the user's file is untouched
