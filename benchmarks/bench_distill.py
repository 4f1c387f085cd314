"""Peak memory and seconds per step of srd-distill training: fused LM head against full logits.

    python benchmarks/bench_distill.py                       # every case below, ~30-40 min on 2 cores
    python benchmarks/bench_distill.py --cases smollm2 --steps 2
    python benchmarks/bench_distill.py --cases chunks        # chunk-size sweep of the fused loss alone

Cases (each arm runs in a fresh process; its peak RSS is the kernel's ``ru_maxrss`` of
that process from ``wait4``: everything it held, models and optimizer state included):

* ``smollm2``: SmolLM2-135M-Instruct (real weights, ``tests/real_models.py``) as teacher
  and student, batch 16 of the longest real SelfInst pairs (prompt and reference up to 256
  tokens each, so batches are up to 512 wide), fkl at T = 2, kd_ratio 0.9, AdamW, grad clip:
  one training step exactly as ``srd-distill train`` takes it (``train.batch_objective``,
  ``make_optimizer``). Arms: ``unfused`` (the models' full logits, then the chunked loss,
  the whole batch in one pass: srd-distill before this benchmark's issue, today
  ``--no-fused-head --micro-batch-tokens 0``), ``fused`` (hidden states, heads per chunk;
  one pass), ``fused+ckpt`` (the same with ``--gradient-checkpointing``) and
  ``fused+micro`` (fused, micro-batches of at most 2048 padded tokens: srd-distill's
  defaults). Every arm sees the same batches; the first step's loss must agree across arms
  (it is computed before any update).
* ``qwen152k``: random Qwen2-layout models with the 151,936-token vocabulary (teacher 4
  layers x 896, student 2 layers x 512, tied embeddings), batch 4 x 512 random tokens with
  an SRD-like mask (prompt of 64-255 tokens, then the response, then right padding), as in
  ``bench_kd_loss.py``. Same arms.
* ``cli``: ``srd-distill train`` itself on the two real SmolLM2 models at the default batch
  16 (``--data`` of the same pairs, ``--max-steps 2``): peak RSS and wall time of the process.
* ``dtype``: srd-distill's default step (``fused+micro``) on the SmolLM2 batches in float32
  (student and teacher) and under bfloat16 autocast over float32 master weights with the
  teacher in bfloat16 (what ``--dtype auto`` does on a CPU with AMX or AVX512-BF16, attention
  there as grouped bfloat16 matmuls, :mod:`srd_distill.cpu_attention`; ``--dtypes``
  picks the arms): seconds per step, GFLOP/s (``peaks.training_step_flop``: 6 x student and 2 x
  teacher non-embedding parameters per real token, plus both LM heads per scored token) as a
  share of the matmul peak of the dtype the arm computes in (both peaks measured at the start
  and the end), the speed-up over float32 and both loss curves step by step.
  ``python benchmarks/bench_distill.py --cases dtype --steps 4``
* ``chunks``: ``fused_kd_objective`` alone (forward + backward) on random hidden states,
  2048 scored tokens, for several chunk sizes, at (vocab 49,152, hidden 576) and
  (151,936, 896): the figures behind the automatic chunk size.

Time per step: the mean of ``--steps`` timed steps after ``--warmup`` untimed ones (the
first step allocates the optimizer state and warms up the allocator). Threads: torch's
default (all cores), as a user's run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_kd_loss import proc_status_kib  # this folder is on sys.path when the script runs
from peaks import best_peaks, cpu_line, matmul_peaks, training_step_flop

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ARMS = ("unfused", "fused", "fused+ckpt", "fused+micro")
MICRO_BATCH_TOKENS = 2048  # srd-distill's default --micro-batch-tokens


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def write_smollm2_pairs(folder: Path, rows: int) -> Path:
    """The ``rows`` longest real SelfInst pairs (human and model answers) as prompt_text/reference_text."""
    import polars as pl
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO_ROOT))
    from tests.real_models import build_real_model

    tokenizer = AutoTokenizer.from_pretrained(build_real_model("smollm2"))
    frame = pl.read_parquet(SHARED_DATA / "selfinst-predictions.parquet")
    pairs = list(dict.fromkeys(
        [(p, r) for p, r in zip(frame["prompt"], frame["reference"])] + [(p, r) for p, r in zip(frame["prompt"], frame["prediction"])]
    ))
    prompt_lengths = [len(ids) for ids in tokenizer([p for p, _ in pairs])["input_ids"]]
    reference_lengths = [len(ids) for ids in tokenizer([r for _, r in pairs])["input_ids"]]
    # srdata's defaults cut prompts and references to 256 tokens each (the reference keeps room for EOS).
    length = [min(a, 256) + min(b + 1, 256) for a, b in zip(prompt_lengths, reference_lengths)]
    order = sorted(range(len(pairs)), key=lambda i: -length[i])[:rows]
    path = folder / "pairs.parquet"
    pl.DataFrame({"prompt_text": [pairs[i][0] for i in order], "reference_text": [pairs[i][1] for i in order]}).write_parquet(path)
    return path


# ----------------------------------------------------------------------------------------
# Child process: one arm
# ----------------------------------------------------------------------------------------


def _models_and_batches(args: argparse.Namespace):
    import torch

    from srd_distill.data import Example, encode_data, find_encoding_settings, read_pairs

    if args.case == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tests.real_models import build_real_model

        folder = build_real_model("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        pairs, _ = read_pairs(args.pairs)
        encoding = find_encoding_settings(args.pairs, echo=lambda _: None)
        examples = encode_data(pairs, tokenizer, encoding, 512).examples
        batches = [examples[i : i + args.batch] for i in range(0, len(examples) - args.batch + 1, args.batch)]
        return teacher, student, batches, len(tokenizer), tokenizer.pad_token_id

    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = 151936

    def qwen(layers: int, hidden: int, heads: int, intermediate: int, seed: int):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024)
        return Qwen2ForCausalLM(config)

    teacher, student = qwen(4, 896, 14, 4864, 1), qwen(2, 512, 8, 2048, 2)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        examples = []
        for _ in range(args.batch):
            prompt = int(torch.randint(64, 256, (1,), generator=gen))
            length = 512 - int(torch.randint(0, 512 // 8, (1,), generator=gen))  # right padding
            examples.append(Example(torch.randint(3, vocab, (length,), generator=gen).tolist(), prompt))
        batches.append(examples)
    return teacher, student, batches, vocab, 0


def child_arm(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from srd_distill.data import collate, split_rows
    from srd_distill.objective import LossSpec, batch_objective
    from srd_distill.step import make_optimizer, optimizer_step
    from srd_distill.fused_head import plan_lm_head
    from srd_distill.memory import autocast_context, enable_gradient_checkpointing, keep_freed_memory, micro_batch_count, weight_cast_scope

    if not args.no_keep_freed_memory:
        keep_freed_memory(torch.device("cpu"))  # as train_stage
    teacher, student, batches, vocab, pad_id = _models_and_batches(args)
    teacher = teacher.to(getattr(torch, args.teacher_dtype)).eval().requires_grad_(False)
    precision = autocast_context(torch.device("cpu"), getattr(torch, args.dtype))  # student: float32 master weights
    if args.arm == "fused+ckpt":
        enable_gradient_checkpointing(student)
    student.train()
    plans = (plan_lm_head(student, vocab, "student"), plan_lm_head(teacher, vocab, "teacher")) if args.arm != "unfused" else (None, None)
    spec = LossSpec("fkl", 2.0, 0.9, "all", vocab, *plans)
    assert spec.fused == (args.arm != "unfused"), plans
    optimizer = make_optimizer(student, 1e-4, 0.01, torch.device("cpu"), getattr(torch, args.dtype))
    setup_rss = proc_status_kib("VmRSS")
    times, losses, widths, scored = [], [], [], []
    tokens = []
    for step in range(args.warmup + args.steps):
        examples = batches[step % len(batches)]
        width = max(len(e.input_ids) for e in examples)
        parts = micro_batch_count(len(examples), width, MICRO_BATCH_TOKENS) if args.arm == "fused+micro" else 1
        step_scored = sum(e.scored_tokens for e in examples)
        started = time.perf_counter()
        loss = 0.0
        with weight_cast_scope(torch.device("cpu"), getattr(torch, args.dtype)):  # as train_stage
            for part in split_rows(list(range(len(examples))), parts):  # as train_stage: token-weighted shares
                batch = collate([examples[i] for i in part], pad_id, torch.device("cpu"))
                out = batch_objective(student, teacher, batch, spec, precision)
                share = batch.scored_tokens / step_scored
                (out.loss * share).backward()
                loss += float(out.loss.detach()) * share
        optimizer_step(optimizer, lr=1e-4, grad_clip=1.0)
        times.append(time.perf_counter() - started)
        losses.append(loss)
        widths.append(width)
        scored.append(step_scored)
        tokens.append(sum(len(e.input_ids) for e in examples))
    timed = times[args.warmup :]
    print(json.dumps({
        "case": args.case, "arm": args.arm, "dtype": args.dtype, "teacher_dtype": args.teacher_dtype, "batch": args.batch,
        "widths": widths, "scored": scored, "tokens": tokens, "flop": [training_step_flop(student, teacher, t, n) for t, n in zip(tokens, scored)],
        "micro_batches": parts,
        "seconds_per_step": sum(timed) / len(timed), "step_seconds": times, "losses": losses,
        "setup_rss_mib": setup_rss / 1024, "peak_rss_mib": proc_status_kib("VmHWM") / 1024, "threads": torch.get_num_threads(),
    }))


def child_chunks(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from srd_distill.fused_head import HeadWeights, LogitPostprocess, fused_kd_objective

    gen = torch.Generator().manual_seed(0)
    n, v, h = 2048, args.vocab, args.hidden
    h_s = (torch.randn(n, h, generator=gen) * 0.5).requires_grad_(True)
    w_s = (torch.randn(v, h, generator=gen) * 0.05).requires_grad_(True)
    h_t, w_t = torch.randn(n, h, generator=gen) * 0.5, torch.randn(v, h, generator=gen) * 0.05
    y = torch.randint(0, v, (n,), generator=gen)
    before = proc_status_kib("VmRSS")
    times = []
    for _ in range(2):
        started = time.perf_counter()
        out = fused_kd_objective(h_s, HeadWeights(w_s, None, LogitPostprocess()), h_t, HeadWeights(w_t, None, LogitPostprocess()),
                                 y, "fkl", 2.0, 0.9, chunk_size=args.chunk)
        out.loss.backward()
        times.append(time.perf_counter() - started)
        h_s.grad = w_s.grad = None
    print(json.dumps({"vocab": v, "hidden": h, "chunk": args.chunk, "seconds": min(times),
                      "extra_mib": (proc_status_kib("VmHWM") - before) / 1024}))


# ----------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------


def run_child(cmd: list[str], log_path: Path) -> tuple[dict | None, float, float, str]:
    """Run ``cmd``; return (its last JSON line or None, peak RSS MiB from wait4, wall seconds, stderr tail)."""
    with open(log_path, "w") as out, open(str(log_path) + ".err", "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = Path(log_path).read_text().strip().splitlines()
    tail = Path(str(log_path) + ".err").read_text()[-600:]
    result = None
    if proc.returncode == 0 and text:
        try:
            result = json.loads(text[-1])
        except json.JSONDecodeError:
            result = None
    return result, usage.ru_maxrss / 1024, wall, tail


def bench_arms(case: str, args: argparse.Namespace, work: Path, pairs: Path | None) -> list[dict]:
    batch = args.batch if case == "smollm2" else args.batch_152k
    print(f"\n== {case}: batch {batch}, fkl T=2, kd_ratio 0.9, {args.warmup} warm-up + {args.steps} timed step(s) per arm ==")
    header = f"{'arm':>11} {'passes':>6} {'width':>6} {'tokens':>7} {'scored':>7} {'s/step':>8} {'peak RSS (MiB)':>15} {'setup RSS':>10} {'step loss':>10} {'peak vs unfused':>16} {'time vs unfused':>16}"
    print(header)
    print("-" * len(header))
    rows = []
    for arm in ARMS:
        cmd = [sys.executable, __file__, "--child", "arm", "--case", case, "--arm", arm, "--batch", str(batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--pairs", str(pairs)] if pairs else [])
        result, peak, _, tail = run_child(cmd, work / f"{case}-{arm.replace('+', '-')}.log")
        if result is None:
            print(f"{arm:>11}: failed: {tail}")
            continue
        result["peak_rss_mib"] = peak
        rows.append(result)
        base = rows[0] if rows[0]["arm"] == "unfused" else None
        ratios = ("", "")
        if base is not None and arm != "unfused":
            ratios = (f"{peak / base['peak_rss_mib']:.2f}x", f"{result['seconds_per_step'] / base['seconds_per_step']:.2f}x")
            rel = abs(result["losses"][0] - base["losses"][0]) / abs(base["losses"][0])
            assert rel < 1e-4, f"{arm} first-step loss {result['losses'][0]} differs from unfused {base['losses'][0]}"
        print(f"{arm:>11} {result['micro_batches']:>6} {max(result['widths']):>6} {result['tokens'][0]:>7} {result['scored'][0]:>7} {result['seconds_per_step']:>8.1f} "
              f"{peak:>15.0f} {result['setup_rss_mib']:>10.0f} {result['losses'][0]:>10.5f} {ratios[0]:>16} {ratios[1]:>16}")
        sys.stdout.flush()
    return rows


def bench_dtypes(args: argparse.Namespace, work: Path, pairs: Path, peaks: dict[str, float]) -> list[dict]:
    """srd-distill's default step (fused head, micro-batches) in float32 and under bfloat16 autocast, same batches."""
    print(f"\n== dtype: SmolLM2 x 2, batch {args.batch}, fused+micro (srd-distill's defaults), {args.warmup} warm-up + "
          f"{args.steps} timed step(s); float32 = student and teacher in float32; bfloat16 = autocast over float32 master "
          "weights, teacher in bfloat16 (srd-distill's --dtype auto on a CPU with AMX or AVX512-BF16) ==")
    rows = []
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, "--child", "arm", "--case", "smollm2", "--arm", "fused+micro", "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--pairs", str(pairs), "--dtype", dtype, "--teacher-dtype", dtype]
        cmd += ["--no-keep-freed-memory"] if args.no_keep_freed_memory else []
        result, _, _, tail = run_child(cmd, work / f"dtype-{dtype}.log")
        if result is None:
            print(f"{dtype:>9}: failed: {tail}")
            continue
        rows.append(result)
    peaks = best_peaks(peaks, matmul_peaks())  # the best of before and after the arms
    print("matmul peaks (best of before and after): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + f"; {cpu_line()}")
    header = f"{'arm':>9} {'s/step':>8} {'GFLOP/s':>8} {'% of its dtype peak':>20} {'x float32':>10}  step losses"
    print(header + "\n" + "-" * (len(header) + 40))
    for result in rows:
        timed = slice(args.warmup, None)
        result["gflops"] = sum(result["flop"][timed]) / sum(result["step_seconds"][timed]) / 1e9
        result["peak_share"] = result["gflops"] / peaks[result["dtype"]]
        speedup = rows[0]["seconds_per_step"] / result["seconds_per_step"] if rows[0]["dtype"] == "float32" else float("nan")
        print(f"{result['dtype']:>9} {result['seconds_per_step']:>8.2f} {result['gflops']:>8.1f} {100 * result['peak_share']:>19.1f}% "
              f"{speedup:>9.2f}x  {[round(x, 4) for x in result['losses']]}")
    if len(rows) == 2:
        gaps = [abs(a - b) / abs(a) for a, b in zip(rows[0]["losses"], rows[1]["losses"])]
        print(f"loss curves: largest relative gap {max(gaps):.2e} (step {gaps.index(max(gaps))}); first step {gaps[0]:.2e}")
    return rows


def bench_cli(args: argparse.Namespace, work: Path, pairs: Path) -> list[dict]:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.real_models import build_real_model

    folder = build_real_model("smollm2")
    print(f"\n== srd-distill train on SmolLM2-135M x 2, default batch 16, --max-steps {args.steps} ==")
    rows = []
    for k, variant in enumerate(args.cli_variants):
        run = work / f"cli-run-{k}"
        cmd = [sys.executable, "-m", "srd_distill.cli", "train", "--teacher", str(folder), "--student", str(folder), "--data", str(pairs),
               "--output", str(run), "--epochs", "1", "--max-steps", str(args.steps), "--log-every", "1", *variant.split()]
        _, peak, wall, tail = run_child(cmd, work / f"cli-{k}.log")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
        ok = len(metrics) == args.steps
        print(f"   srd-distill train --teacher SmolLM2 --student SmolLM2 --data pairs.parquet --epochs 1 --max-steps {args.steps} {variant}")
        print(f"   {'finished' if ok else 'FAILED'}: peak RSS {peak:.0f} MiB ({peak / 1024:.2f} GiB), wall {wall:.0f} s "
              f"(loading and saving included), step losses {[round(m['loss'], 4) for m in metrics]}")
        if not ok:
            print(tail)
        rows.append({"flags": variant, "peak_rss_mib": peak, "wall_s": wall, "steps": len(metrics), "metrics": metrics})
        sys.stdout.flush()
    return rows


def bench_chunks(args: argparse.Namespace, work: Path) -> list[dict]:
    print("\n== fused_kd_objective alone: 2048 scored tokens, forward + backward (fastest of 2), fkl ==")
    print(f"{'vocab':>7} {'hidden':>6} {'chunk':>6} {'seconds':>8} {'extra (MiB)':>12}")
    rows = []
    for vocab, hidden in ((49152, 576), (151936, 896)):
        for chunk in args.chunk_sizes:
            cmd = [sys.executable, __file__, "--child", "chunks", "--vocab", str(vocab), "--hidden", str(hidden), "--chunk", str(chunk)]
            result, _, _, tail = run_child(cmd, work / f"chunks-{vocab}-{chunk}.log")
            if result is None:
                print(f"{vocab:>7} {hidden:>6} {chunk:>6}: failed: {tail}")
                continue
            rows.append(result)
            print(f"{vocab:>7} {hidden:>6} {chunk:>6} {result['seconds']:>8.2f} {result['extra_mib']:>12.0f}")
            sys.stdout.flush()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["smollm2", "cli", "qwen152k", "chunks", "dtype"],
                        choices=["smollm2", "cli", "qwen152k", "chunks", "dtype"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="compute dtypes of the dtype case (float32 first)")
    parser.add_argument("--batch", type=int, default=16, help="rows per step, SmolLM2 arms")
    parser.add_argument("--batch-152k", type=int, default=4, help="rows per step, 152k-vocabulary arms")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm (and --max-steps of the CLI run)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--cli-variants", nargs="+", default=["", "--gradient-checkpointing"],
                        help="extra flags of each srd-distill run (one string per run)")
    parser.add_argument("--json-out", type=Path, help="write every figure here as JSON")
    parser.add_argument("--child", choices=["arm", "chunks"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="arms without srd_distill.memory.keep_freed_memory (glibc's default trimming: page faults)")
    args = parser.parse_args()
    if args.child == "arm":
        child_arm(args)
        return
    if args.child == "chunks":
        child_chunks(args)
        return

    import torch

    print(f"srd-distill training-step benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print(cpu_line())
    peaks = matmul_peaks()
    print("matmul peaks at start (2048x2048, best of 10): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        pairs = None
        if {"smollm2", "cli", "dtype"} & set(args.cases):
            pairs = write_smollm2_pairs(work, args.batch * (args.warmup + args.steps))
        if "smollm2" in args.cases:
            figures["smollm2"] = bench_arms("smollm2", args, work, pairs)
        if "cli" in args.cases:
            figures["cli"] = bench_cli(args, work, pairs)
        if "qwen152k" in args.cases:
            figures["qwen152k"] = bench_arms("qwen152k", args, work, None)
        if "chunks" in args.cases:
            figures["chunks"] = bench_chunks(args, work)
        if "dtype" in args.cases:
            figures["dtype"] = bench_dtypes(args, work, pairs, peaks)
        end = matmul_peaks()
        print("\nmatmul peaks at end: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in end.items()) + f"; {cpu_line()}")
        figures["peaks"] = best_peaks(peaks, end)
    print("\npeak RSS: the whole process (both models, optimizer state, activations), kernel ru_maxrss; setup RSS: "
          "before the first step; s/step: mean of the timed steps; width/tokens/scored: first batch.")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
