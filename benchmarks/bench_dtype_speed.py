"""float32 vs bfloat16 end to end: `srdata.score` on the same rows, the dtypes interleaved, N rounds.

The speed half of the ``--dtype auto`` rule (srdata/backends/dtype.py); bench_dtype.py gives
the agreement half. Run it on a quiet machine: it prints wall and process CPU seconds and
the load average after each run.

    flock /tmp/srdata-heavy.lock python benchmarks/bench_dtype_speed.py --rows ROWS.jsonl --model MODEL --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import srdata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, help="a .jsonl of rows (bench_dtype.py writes its row set to WORK/rows.jsonl)")
    parser.add_argument("--model", required=True, help="a save_pretrained folder (e.g. ~/.cache/srdata/models/SmolLM2-135M-Instruct-*)")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="srdata-dtype-speed-"))
    lines = Path(args.rows).read_text(encoding="utf-8").splitlines()[: args.limit]
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(json.loads(line)) + "\n" for line in lines), encoding="utf-8")
    print(f"{len(lines)} rows, {args.threads} thread(s); load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    best: dict[str, float] = {}
    for round_ in range(args.rounds):
        for dtype in ("float32", "bfloat16"):
            out = work / f"run-{dtype}-{round_}"
            wall, cpu = time.perf_counter(), time.process_time()
            srdata.score(dataset=str(data), model=args.model, output=str(out), dtype=dtype, device="cpu",
                         max_new_tokens=args.max_new_tokens, template="chat", progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[dtype] = min(best.get(dtype, wall), wall)
            print(f"round {round_} {dtype}: wall {wall:.1f} s, cpu {cpu:.1f} s, load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    print(f"bfloat16 speed-up (best wall): {best['float32'] / best['bfloat16']:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
