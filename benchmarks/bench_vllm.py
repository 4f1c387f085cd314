"""Throughput of the vLLM backend against the transformers backend and raw vLLM (issue 7).

Three measurements on the same GPU, model and T0 rows (``../shared/data/t0-train.parquet``):

1. **transformers, reference-style**: :class:`HFBackend` scoring then greedy generation
   in fixed batches of ``--hf-batch-size`` rows (16, the SRD reference's batch size), on
   the first ``--hf-rows`` rows (it is slow; rows/s does not depend on the row count).
2. **raw vLLM generate**: ``LLM.generate`` on the same token-id prompts, greedy, same
   ``max_tokens`` and stop id, no scoring: the ceiling for generation alone.
3. **srdata vLLM backend**: ``score`` then ``generate`` on all rows, through
   ``VLLMBackend.score_and_generate`` (windows that fit the KV cache), with the prefix
   cache emptied first.

4. **scoring alone, both request forms** (issue 23): ``VLLMBackend.score`` on all rows
   asking for every prompt position (``prompt_logprobs=0``) and, where the engine serves
   it (vLLM >= 0.32 on Model Runner V2), for the reference rows alone
   (``prompt_logprob_token_ids``); same scores required, rows/s of each.

Targets (issue 7): (3) >= 10x (1) in rows/s, and (3) >= 80% of (2) in rows/s although
(3) also scores every reference. Printed as a table; ``--json`` also writes the figures.

Without a model path, a random-weight Qwen2 of the 0.5B layout is built (as in
tests/gpu/test_vllm_parity.py) under ``--work-dir`` and reused on later runs.

    python benchmarks/bench_vllm.py --rows 4000 --json benchmarks/vllm.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder; default: build a random Qwen2 0.5B layout")
    parser.add_argument("--work-dir", default="/tmp/srdata-bench-vllm", help="where the built model is kept")
    parser.add_argument("--rows", type=int, default=4000, help="T0 rows for the vLLM runs")
    parser.add_argument("--hf-rows", type=int, default=256, help="rows for the transformers run")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-reference-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def require_gpu_and_vllm() -> None:
    """Exit with a clear message where the benchmark cannot run."""
    if importlib.util.find_spec("vllm") is None:
        sys.exit("bench_vllm: vLLM is not installed (pip install 'srdata[vllm]'); nothing was measured")
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_vllm: no CUDA GPU is visible; the vLLM backend needs one; nothing was measured")
    if not (SHARED_DATA / "t0-train.parquet").is_file():
        sys.exit(f"bench_vllm: {SHARED_DATA / 't0-train.parquet'} is absent; nothing was measured")


def build_qwen2_05b_layout(path: Path, texts: list[str], *, vocab_size: int = 32_000, seed: int = 0) -> Path:
    """A random-weight Qwen2 with the 0.5B layout, saved in bfloat16 (the GPU dtype)."""
    from srdata.demo.tiny import build_qwen2_05b_layout as build

    return build(path, texts, vocab_size=vocab_size, seed=seed, dtype="bfloat16")


def load_rows(rows: int, seed: int) -> tuple[list[str], list[str]]:
    """``rows`` T0 prompt/response pairs, sampled without replacement (empty responses kept: real data)."""
    import polars as pl

    frame = pl.read_parquet(SHARED_DATA / "t0-train.parquet")
    frame = frame.sample(min(rows, frame.height), seed=seed, shuffle=True)
    return frame["prompt"].to_list(), frame["response"].to_list()


def figures(name: str, rows: int, seconds: float, processed: int, generated: int, **extra: Any) -> dict[str, Any]:
    return {
        "run": name,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": rows / seconds,
        "tokens_per_s": processed / seconds,  # every token the model processed or produced
        "generated_tokens_per_s": generated / seconds,
        **extra,
    }


def run_hf(model: Path, prompts, references, params, args) -> dict[str, Any]:
    import torch

    from srdata.backends.hf import HFBackend

    backend = HFBackend.from_pretrained(
        model, device="cuda", dtype=args.dtype, batch_size=args.hf_batch_size, token_budget=10**9
    )
    warm = min(4, len(prompts))
    backend.score(prompts[:warm], references[:warm])
    backend.generate(prompts[:warm], params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    backend.score(prompts, references)
    generations = backend.generate(prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(g.token_ids) for g in generations)
    processed = sum(len(p) + len(r) for p, r in zip(prompts, references)) + sum(map(len, prompts)) + generated
    del backend
    gc.collect()
    torch.cuda.empty_cache()
    return figures("transformers (reference-style)", len(prompts), seconds, processed, generated)


def reset_prefix_cache(llm: Any) -> None:
    """Empty the prefix cache so that no run profits from the previous one's blocks."""
    if llm.reset_prefix_cache() is False:  # False while requests are running
        raise RuntimeError("vLLM did not reset its prefix cache")


def run_raw_vllm(backend: Any, prompts, params) -> dict[str, Any]:
    from vllm import SamplingParams

    sampling = SamplingParams(
        temperature=0.0, max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids), detokenize=False
    )
    requests = [{"prompt_token_ids": list(p)} for p in prompts]
    reset_prefix_cache(backend.llm)
    start = time.perf_counter()
    outputs = backend.llm.generate(requests, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    processed = sum(map(len, prompts)) + generated
    return figures("raw vLLM generate", len(prompts), seconds, processed, generated)


def run_backend(backend: Any, prompts, references, params) -> dict[str, Any]:
    reset_prefix_cache(backend.llm)
    backend.prefix_cache_stats = {key: 0 for key in backend.prefix_cache_stats}
    start = time.perf_counter()
    # Scoring then generation, in windows that fit the KV cache (one window when all rows fit).
    _, generations = backend.score_and_generate(prompts, references, params)
    seconds = time.perf_counter() - start
    generated = sum(len(g.token_ids) for g in generations)
    processed = sum(len(p) + len(r) for p, r in zip(prompts, references)) + sum(map(len, prompts)) + generated
    stats = backend.prefix_cache_stats
    hit = stats["generation_cached_tokens"] / max(1, stats["generation_prompt_tokens"])
    name = "srdata vLLM backend (score + generate)"
    return figures(name, len(prompts), seconds, processed, generated, prefix_cache_hit=hit)


def run_scoring_paths(backend: Any, prompts, references) -> list[dict[str, Any]]:
    """``score`` on all rows with each request form the engine serves; the scores must agree."""
    from srdata.backends.vllm_runner import ALL_POSITIONS, REFERENCE_ROWS

    served = backend.scoring
    paths = [ALL_POSITIONS] + ([REFERENCE_ROWS] if served == REFERENCE_ROWS else [])
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, references))
    results, scores = [], {}
    try:
        for path in paths:
            backend.scoring = path
            reset_prefix_cache(backend.llm)
            start = time.perf_counter()
            scores[path] = backend.score(prompts, references)
            seconds = time.perf_counter() - start
            results.append(figures(f"score only ({path})", len(prompts), seconds, tokens, 0))
    finally:
        backend.scoring = served
    if len(scores) == 2:
        worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(scores[REFERENCE_ROWS], scores[ALL_POSITIONS]))
        results[-1]["worst_relative_difference"] = worst
        results[-1]["speedup"] = results[-1]["rows_per_s"] / results[0]["rows_per_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_gpu_and_vllm()
    import torch
    from transformers import AutoTokenizer

    from srdata.backends import GenerationParams
    from srdata.backends.vllm import VLLMBackend
    from srdata.steps.tokenize import encode_pairs

    prompts_text, responses = load_rows(args.rows, args.seed)
    if args.model:
        model = Path(args.model)
    else:
        model = Path(args.work_dir) / "qwen2-0.5b-layout-random"
        if not (model / "config.json").is_file():
            print(f"building a random Qwen2 0.5B-layout model under {model} ...", flush=True)
            import polars as pl

            frame = pl.read_parquet(SHARED_DATA / "t0-train.parquet").head(20_000)
            build_qwen2_05b_layout(model, (frame["prompt"] + " " + frame["response"]).to_list(), seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = encode_pairs(
        tokenizer,
        prompts_text,
        responses,
        max_prompt_tokens=args.max_prompt_tokens,
        max_reference_tokens=args.max_reference_tokens,
    )
    prompts = [p.prompt_ids for p in pairs]
    references = [p.reference_ids for p in pairs]
    params = GenerationParams(max_new_tokens=args.max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))

    results = []
    if not args.skip_hf:
        hf_rows = min(args.hf_rows, len(prompts))
        results.append(run_hf(model, prompts[:hf_rows], references[:hf_rows], params, args))
        print(json.dumps(results[-1]), flush=True)

    backend = VLLMBackend.from_pretrained(
        model,
        tokenizer=tokenizer,
        dtype=args.dtype,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    backend.score(prompts[:16], references[:16])  # warm-up outside the timings
    backend.generate(prompts[:16], params)
    kv_tokens = backend.kv_cache_tokens()
    results.append(run_raw_vllm(backend, prompts, params))
    print(json.dumps(results[-1]), flush=True)
    results.append(run_backend(backend, prompts, references, params))
    print(json.dumps(results[-1]), flush=True)
    ours, raw = results[-1], results[-2]
    scoring = run_scoring_paths(backend, prompts, references)
    results += scoring
    print(json.dumps(scoring), flush=True)
    backend.close()

    summary: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "model": str(model),
        "dtype": args.dtype,
        "rows": len(prompts),
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "kv_cache_tokens": kv_tokens,
        "scored_tokens": sum(len(p) + len(r) for p, r in zip(prompts, references)),
        "vllm_vs_raw_rows_per_s": ours["rows_per_s"] / raw["rows_per_s"],
        "runs": results,
    }
    if not args.skip_hf:
        summary["vllm_vs_transformers_rows_per_s"] = ours["rows_per_s"] / results[0]["rows_per_s"]

    print()
    print(f"{'run':42} {'rows':>6} {'s':>9} {'rows/s':>9} {'tok/s':>11} {'gen tok/s':>10}")
    for r in results:
        print(
            f"{r['run']:42} {r['rows']:6d} {r['seconds']:9.2f} {r['rows_per_s']:9.2f} "
            f"{r['tokens_per_s']:11.0f} {r['generated_tokens_per_s']:10.0f}"
        )
    print(f"\nsrdata vLLM / raw vLLM generate (rows/s): {summary['vllm_vs_raw_rows_per_s']:.2f}  (target >= 0.80)")
    if "vllm_vs_transformers_rows_per_s" in summary:
        ratio = summary["vllm_vs_transformers_rows_per_s"]
        print(f"srdata vLLM / transformers (rows/s):      {ratio:.1f}x  (target >= 10x)")
    print(f"generation prompt tokens served from the prefix cache: {ours['prefix_cache_hit']:.1%}")
    if "speedup" in scoring[-1]:
        last = scoring[-1]
        print(f"scoring the reference rows alone / every position (rows/s): {last['speedup']:.2f}x "
              f"(worst relative score difference {last['worst_relative_difference']:.1e})")
    else:
        print("this engine scores every prompt position (no reference-rows scoring: vLLM < 0.32 or the V1 runner)")
    if kv_tokens and summary["scored_tokens"] > kv_tokens:
        print(f"note: {summary['scored_tokens']} scored tokens exceed the KV cache ({kv_tokens}); reuse is partial")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
