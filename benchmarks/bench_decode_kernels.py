"""The kernels behind the transformers backend's decode and continuation paths, one at a time.

Prints, for SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 query heads over 3 KV heads,
head dim 64, vocabulary 49,152), each path srdata takes against the one it replaced,
measured in the same run (best of 3 passes over 30-90 distinct weights or caches, so the
data streams from memory as in a real decode step, not from the CPU's caches):

* linear layers at decode sizes (rows = sequences in the batch): ``F.linear`` on the plain
  weight vs oneDNN's packed weight (``srdata.backends.packed``), and whether the results
  are bit-identical;
* the attention of a reference scored after its cached prompt (4 query tokens):
  transformers' ``sdpa`` (``repeat_kv`` copies of keys and values) vs the grouped layout
  (``srdata.backends.attention``);
* the attention of one decode step: torch's kernel over the whole padded static cache, over
  the key columns the rows can see (``key_spans``), and srdata's native kernel
  (``srdata.backends.native``: bfloat16 on AVX512-BF16 CPUs), each one's error against a
  float64 reference, on left-padded prompts of mixed length;
* each decode step's choice of token: a float32 copy of the logits + ``argmax`` (what
  ``generate()`` does) vs ``max`` on the logits in their own dtype (``greedy_choice``);
* with ``--attention-alternatives``: the decode step's attention in float32 math (bf16
  cache read, scores and softmax in float32) eager and compiled by ``torch.compile``
  (inductor's C++ backend, dynamic shapes; compile time printed apart), each one's error
  against a float64 reference beside the flash kernel's. Measured and not used (see
  benchmarks/README.md).

Usage:
    python benchmarks/bench_decode_kernels.py --threads 1
    python benchmarks/bench_decode_kernels.py --threads 1 --attention-alternatives
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # srdata from this checkout, installed or not


def best_seconds(fn, passes: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def linears(dtype: torch.dtype) -> None:
    reorder, packed_linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    for out_features, in_features, count in ((1536, 576, 90), (49152, 576, 3)):
        weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(count)]
        packed = [reorder(w, 64) for w in weights]
        for rows in (16, 32, 64, 1024):
            x = torch.randn(rows, in_features).to(dtype)
            flop = 2 * rows * in_features * out_features * count
            plain_s = best_seconds(lambda: [F.linear(x, w) for w in weights])
            packed_s = best_seconds(lambda: [packed_linear(x, p, None, "none", [None], "") for p in packed])
            same = all(torch.equal(F.linear(x, w), packed_linear(x, p, None, "none", [None], "")) for w, p in zip(weights[:3], packed[:3]))
            print(f"  {str(dtype)[6:]:>8} linear {in_features}->{out_features:<6} rows {rows:>5}: plain {flop / plain_s / 1e9:6.1f}  "
                  f"packed {flop / packed_s / 1e9:6.1f} GFLOP/s  ({plain_s / packed_s:.2f}x)  bit-identical: {same}")


def continuation(dtype: torch.dtype, batch: int = 22, keys: int = 806, q_len: int = 4) -> None:
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from srdata.backends.attention import grouped_decode_sdpa

    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    cases = []
    for _ in range(30):
        query = torch.randn(batch, 9, q_len, 64).to(dtype)
        key, value = torch.randn(batch, 3, keys, 64).to(dtype), torch.randn(batch, 3, keys, 64).to(dtype)
        mask = torch.ones(batch, 1, q_len, keys, dtype=torch.bool)
        mask[:, :, :, keys - q_len :] = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))
        cases.append((query, key, value, mask))
    plain = best_seconds(lambda: [sdpa_attention_forward(module, *case, scaling=0.125) for case in cases])
    grouped = best_seconds(lambda: [grouped_decode_sdpa(module, *case, scaling=0.125) for case in cases])
    same = all(torch.equal(sdpa_attention_forward(module, *c, scaling=0.125)[0], grouped_decode_sdpa(module, *c, scaling=0.125)[0]) for c in cases[:3])
    print(f"  {str(dtype)[6:]:>8} reference continuation, {batch} rows x {q_len} tokens over {keys} keys: repeat_kv "
          f"{plain / 30 * 1e3:6.2f} ms  grouped {grouped / 30 * 1e3:6.2f} ms a layer ({plain / grouped:.1f}x)  bit-identical: {same}")


def decode_step(dtype: torch.dtype, batch: int = 32, prompt_width: int = 288, room: int = 32) -> None:
    """One decode step's attention: torch's kernel over the whole cache, over the visible columns (key_spans), and
    srdata's native kernel (bfloat16 on AVX512-BF16 CPUs), with each one's error against float64."""
    from srdata.backends import native
    from srdata.backends.attention import key_spans

    generator = torch.Generator().manual_seed(0)
    lengths = sorted(torch.randint(40, prompt_width + 1, (batch,), generator=generator).tolist(), reverse=True)
    keys = prompt_width + room
    mask = torch.zeros(batch, 1, 1, keys, dtype=torch.bool)
    for row, length in enumerate(lengths):  # left padded, 4 new tokens decoded so far
        mask[row, ..., prompt_width - length : prompt_width + 4] = True
    cases = [(torch.randn(batch, 3, 3, 64).to(dtype), torch.randn(batch, 3, keys, 64).to(dtype), torch.randn(batch, 3, keys, 64).to(dtype)) for _ in range(30)]
    spans = key_spans(mask, batch, keys)

    def whole(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)

    def visible(q, k, v):  # what grouped_decode_sdpa runs where the native kernel is not used
        return torch.cat([F.scaled_dot_product_attention(q[a:b], k[a:b, :, s:e], v[a:b, :, s:e], attn_mask=mask[a:b, ..., s:e], scale=0.125)
                          for a, b, s, e in spans])

    def srdata_kernel(q, k, v):
        return native.decode_attention(q, k, v, mask, 0.125)

    arms = [("torch, whole cache", whole), ("torch, visible columns", visible)]
    if srdata_kernel(*cases[0]) is not None:
        arms.append(("srdata native kernel", srdata_kernel))
    read = sum((b - a) * (end - start) for a, b, start, end in spans)
    print(f"  {str(dtype)[6:]:>8} decode step, {batch} rows, prompts {min(lengths)}-{max(lengths)} tokens, cache {keys} columns "
          f"({read / (batch * keys):.0%} of the cache in the visible spans):")
    base = None
    for label, fn in arms:
        seconds = best_seconds(lambda: [fn(q, k, v) for q, k, v in cases]) / 30
        base = base or seconds
        worst = 0.0
        for q, k, v in cases[:5]:
            exact = torch.softmax((q.double() @ k.double().transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf")), -1) @ v.double()
            worst = max(worst, float((fn(q, k, v).double() - exact).abs().max() / exact.abs().max()))
        print(f"    {label:<24} {seconds * 1e3:5.2f} ms a layer ({base / seconds:.2f}x the whole cache); max error vs float64 {worst:.2e}")


def greedy_choice(vocab: int = 49152) -> None:
    from srdata.backends.decode import greedy_choice as choice

    for dtype in (torch.bfloat16, torch.float32):
        for rows in (16, 32, 64):
            steps = [torch.randn(rows, 1, vocab).to(dtype) for _ in range(20)]  # a step's logits, as the model returns them
            copied = best_seconds(lambda: [x[:, -1, :].to(dtype=torch.float32).argmax(dim=-1) for x in steps])
            own = best_seconds(lambda: [choice(x[:, -1, :]) for x in steps])
            same = all(torch.equal(x[:, -1, :].float().argmax(-1), choice(x[:, -1, :])) for x in steps)
            print(f"  {str(dtype)[6:]:>8} {rows:>3} rows x {vocab}: float32 copy + argmax {copied / 20 * 1e3:5.2f} ms  "
                  f"max in own dtype {own / 20 * 1e3:5.2f} ms a step ({copied / own:.2f}x)  same ids: {same}")


def _float32_math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Grouped decode attention with the cache read in its dtype and every product, sum and the softmax in float32."""
    kf = k.float()
    scores = torch.stack([(q[:, :, g, None, :].float() * kf).sum(-1) for g in range(q.shape[2])], 2) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return (probs[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)


def attention_alternatives(batch: int = 32, prompt_width: int = 288, room: int = 32) -> None:
    from srdata.backends.attention import key_spans

    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    lengths = sorted(torch.randint(40, prompt_width + 1, (batch,), generator=generator).tolist(), reverse=True)
    keys = prompt_width + room
    mask = torch.zeros(batch, 1, 1, keys, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, ..., prompt_width - length : prompt_width + 4] = True
    cases = [(torch.randn(batch, 3, 3, 64).to(dtype), torch.randn(batch, 3, keys, 64).to(dtype), torch.randn(batch, 3, keys, 64).to(dtype)) for _ in range(30)]
    spans = key_spans(mask, batch, keys)

    def flash(q, k, v, m, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)

    def matmul_f32(q, k, v, m, scale):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale).masked_fill_(~m, float("-inf"))
        return torch.matmul(torch.softmax(scores, -1), v.float()).to(q.dtype)

    t0 = time.perf_counter()
    compiled = torch.compile(_float32_math_attention, dynamic=True)
    for a, b, start, end in spans:  # compile for the spans' shapes (dynamic: one graph)
        q, k, v = cases[0]
        compiled(q[a:b], k[a:b, :, start:end], v[a:b, :, start:end], mask[a:b, ..., start:end], 0.125)
    compile_s = time.perf_counter() - t0

    def per_layer(fn, whole: bool) -> float:
        if whole:
            return best_seconds(lambda: [fn(q, k, v, mask, 0.125) for q, k, v in cases]) / 30
        return best_seconds(lambda: [[fn(q[a:b], k[a:b, :, s:e], v[a:b, :, s:e], mask[a:b, ..., s:e], 0.125) for a, b, s, e in spans] for q, k, v in cases]) / 30

    errors = {}
    for name, fn in (("flash (used)", flash), ("float32 matmuls", matmul_f32), ("float32, inductor", compiled)):
        worst = 0.0
        for q, k, v in cases[:5]:
            exact = torch.softmax((q.double() @ k.double().transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf")), -1) @ v.double()
            worst = max(worst, float((fn(q, k, v, mask, 0.125).double() - exact).abs().max() / exact.abs().max()))
        errors[name] = worst
        print(f"  bfloat16 decode step attention, {name:<18}: visible columns {per_layer(fn, False) * 1e3:5.2f} ms  whole cache "
              f"{per_layer(fn, True) * 1e3:5.2f} ms a layer; max error vs float64 {worst:.2e} (of the largest output)")
    print(f"  (torch.compile: {compile_s:.1f} s to compile, not in the figures above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention-alternatives", action="store_true", help="also time float32-math attention, eager and torch.compile'd")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with torch.inference_mode():
        print("linear layers (plain vs packed weights):")
        for dtype in (torch.bfloat16, torch.float32):
            linears(dtype)
        print("attention:")
        for dtype in (torch.bfloat16, torch.float32):
            continuation(dtype)
            decode_step(dtype)
        print("greedy choice of each step's token:")
        greedy_choice()
        if args.attention_alternatives:
            print("decode attention in float32 math (not used):")
            attention_alternatives()
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
