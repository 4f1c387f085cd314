"""Offline KD (`srd-distill --teacher-logits`) against online KD (`--teacher`): time, memory, test quality.

    python benchmarks/bench_offline_kd.py                      # testbed, 2 seeds, fkl, the SRD schedule
    python benchmarks/bench_offline_kd.py --seeds 0 1 2 --top-k 32 --out runs/bench-offline-kd

Testbed (the repro's quick sizes, 800 training pairs), teacher Llama 4 x 128 (the repro's full
teacher: about 7x the student's parameters, 1,000 steps), student Llama 2 x 64 (150
warm-up steps). Per seed: ``srdata score`` -> ``srdata teach --top-k K`` ->
``srdata export`` (4 stages keep 3) -> the same ``srd-distill train --curriculum`` (paper-gpt2
schedule, 4 epochs per stage as the repro, fkl, batch 16, 1 thread) twice: online (the teacher loaded
and run on every step) and offline (the cached top-K, no teacher). Both runs in one process
each, one after the other, on the same machine.

Prints per arm: training seconds (sum of the stages), seconds per step, peak RSS of the
training process, test exact match and ROUGE-L; and the offline/online ratios, with the teach
pass's time added to the offline arm ("including the teach pass"). The goal (issue 23):
offline training <= 0.5x online at the same settings, test quality within seed noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import testbed_models  # noqa: E402  (this folder)
from srd_distill.testbed_models import student_recipe, teacher_recipe, evaluate_model, model_parameters  # noqa: E402
from srdata.demo.testbed import TestbedSpec  # noqa: E402

SPEC = TestbedSpec(train_pairs=800, dev_pairs=32, test_pairs=160, teacher_pairs=12000, warmup_pairs=4000, noise_fraction=0.10)
TEACHER = teacher_recipe(steps=1000)
STUDENT = student_recipe(steps=150)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def timed(args: list[str], log: Path) -> tuple[float, int]:
    """Run a command in a child of its own; its wall seconds and peak RSS (bytes)."""
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-c", wrapper, *args], stdout=out, stderr=subprocess.PIPE, text=True, env=ENV)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-2000:]}\n{log.read_text()[-2000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1]) * 1024


def cli(name: str) -> list[str]:
    return [sys.executable, "-m", {"srdata": "srdata.cli", "srd-distill": "srd_distill.cli"}[name]]


def run_seed(out: Path, seed: int, top_k: int, epochs: int) -> dict:
    files, teacher, student = testbed_models(out, SPEC, TEACHER, STUDENT, seed)
    run, logs = out / f"run-{seed}", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (run / "annotated.parquet").is_file():
        timed([*cli("srdata"), "score", str(files.train), "--model", str(student), "--output", str(run), "--device", "cpu",
               "--max-new-tokens", "24", "--max-prompt-tokens", "64", "--max-reference-tokens", "32", "-q"], logs / f"score-{seed}.log")
    teach_seconds, teach_rss = timed([*cli("srdata"), "teach", str(run), "--teacher", str(teacher), "--top-k", str(top_k),
                                      "--device", "cpu", "--overwrite", "-q"], logs / f"teach-{seed}.log")
    timed([*cli("srdata"), "export", str(run)], logs / f"export-{seed}.log")  # after the teach pass: the stages carry its columns
    common = ["--student", str(student), "--curriculum", str(run / "curriculum"), "--schedule", "paper-gpt2", "--epochs", str(epochs),
              "--loss", "fkl", "--lr", "1e-3", "--batch-size", "16", "--seed", str(seed), "--device", "cpu", "--overwrite", "--quiet"]
    arms = {}
    for arm, source in (("online", ["--teacher", str(teacher)]), ("offline", ["--teacher-logits", str(run)])):
        output = out / f"kd-{arm}-{seed}"
        seconds, rss = timed([*cli("srd-distill"), "train", *source, *common, "--output", str(output)], logs / f"{arm}-{seed}.log")
        record = json.loads((output / "run.json").read_text())
        stages = sorted(record["stages_finished"], key=lambda s: s["stage"])
        steps = sum(s["steps"] for s in stages)
        train_seconds = sum(s["seconds"] for s in stages)
        test = evaluate_model(output / f"stage-{stages[-1]['stage']}", files.test, max_new_tokens=24)
        arms[arm] = {"process_seconds": seconds, "train_seconds": train_seconds, "steps": steps, "seconds_per_step": train_seconds / steps,
                     "peak_rss_bytes": rss, "test_exact_match": test["overall"]["exact_match"], "test_rouge_l": test["overall"]["rouge_l"]}
    return {"teach_seconds": teach_seconds, "teach_peak_rss_bytes": teach_rss, "top_k": top_k, "arms": arms,
            "teacher_parameters": model_parameters(teacher), "student_parameters": model_parameters(student)}


def real_model_step(out: Path, run: Path, steps: int = 3) -> dict:
    """A few steps of one stage on the real model (SmolLM2 as teacher and student): online vs offline, time and peak RSS."""
    from tests.real_models import real_model_or_skip

    model = real_model_or_skip("smollm2")
    logs = out / "logs"
    timed([*cli("srdata"), "export", str(run)], logs / "real-export.log")
    common = ["--student", str(model), "--curriculum", str(run / "curriculum"), "--epochs", "1", "--max-steps", str(steps),
              "--batch-size", "8", "--device", "cpu", "--overwrite", "--quiet", "--checkpoint-interval", "0"]
    result = {}
    for arm, source in (("online", ["--teacher", str(model)]), ("offline", ["--teacher-logits", str(run)])):
        output = out / f"real-{arm}"
        seconds, rss = timed([*cli("srd-distill"), "train", *source, *common, "--output", str(output)], logs / f"real-{arm}.log")
        stages = json.loads((output / "run.json").read_text())["stages_finished"]
        train_seconds = sum(s["seconds"] for s in stages)
        result[arm] = {"train_seconds": train_seconds, "steps": sum(s["steps"] for s in stages), "peak_rss_bytes": rss}
        print(f"real model, {arm}: {train_seconds:.1f} s for {result[arm]['steps']} steps, peak RSS {rss / 2**30:.2f} GiB")
    print(f"real model offline / online: time {result['offline']['train_seconds'] / result['online']['train_seconds']:.2f}x, "
          f"peak memory {result['offline']['peak_rss_bytes'] / result['online']['peak_rss_bytes']:.2f}x")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--real-run", type=Path, default=None,
                        help="also time one real-model stage: a run scored and taught (--top-k) with SmolLM2 as student and teacher")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-offline-kd"))
    args = parser.parse_args()
    results = {seed: run_seed(args.out, seed, args.top_k, args.epochs) for seed in args.seeds}
    first = results[args.seeds[0]]
    print(f"teacher {first['teacher_parameters']:,} parameters, student {first['student_parameters']:,}; top-K {args.top_k}")
    for seed, r in results.items():
        on, off = r["arms"]["online"], r["arms"]["offline"]
        print(f"seed {seed}: online {on['train_seconds']:.1f} s ({on['seconds_per_step'] * 1000:.0f} ms/step, {on['peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"EM {on['test_exact_match']:.3f}); offline {off['train_seconds']:.1f} s ({off['seconds_per_step'] * 1000:.0f} ms/step, "
              f"{off['peak_rss_bytes'] / 2**20:.0f} MiB, EM {off['test_exact_match']:.3f}); teach pass {r['teach_seconds']:.1f} s")
    ratio = statistics.fmean(r["arms"]["offline"]["train_seconds"] / r["arms"]["online"]["train_seconds"] for r in results.values())
    ratio_with_teach = statistics.fmean((r["arms"]["offline"]["train_seconds"] + r["teach_seconds"]) / r["arms"]["online"]["train_seconds"]
                                        for r in results.values())
    memory = statistics.fmean(r["arms"]["offline"]["peak_rss_bytes"] / r["arms"]["online"]["peak_rss_bytes"] for r in results.values())
    em = [r["arms"]["offline"]["test_exact_match"] - r["arms"]["online"]["test_exact_match"] for r in results.values()]
    print(f"offline / online training time: {ratio:.2f}x ({ratio_with_teach:.2f}x including the teach pass); peak memory {memory:.2f}x; "
          f"test EM offline - online per seed: {', '.join(f'{d:+.3f}' for d in em)}")
    real = real_model_step(args.out, args.real_run) if args.real_run else None
    (args.out / "results.json").write_text(json.dumps({"seeds": results, "time_ratio": ratio, "time_ratio_with_teach": ratio_with_teach,
                                                       "memory_ratio": memory, "em_differences": em, "real_model": real}, indent=2) + "\n")


if __name__ == "__main__":
    main()
