"""Peak memory and time of the chunked KD loss against a naive full-logits implementation.

    python benchmarks/bench_kd_loss.py                      # defaults below, a few minutes on 2 cores
    python benchmarks/bench_kd_loss.py --vocabs 32000 --losses fkl --batch 2

Both variants run forward + backward on bfloat16 logits ``(batch, seq, vocab)`` at
temperature 2 with the T^2 factor, on a response mask like SRD's data (a prompt of 64-255
tokens, then the response, then right padding), so only part of the tokens are scored:

* ``naive``: what the reference code does: upcast both full logit tensors to float32,
  softmax over every position, mask the per-token losses, autograd backward.
* ``chunked``: ``srd_distill.losses.kd_divergence`` (scored positions only, a chunk of
  tokens upcast at a time, closed-form gradient), automatic chunk size (CPU: about
  2**20 / vocab tokens).

Each (vocab, loss, variant) runs in a fresh subprocess. Memory: after the inputs exist the
child resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux),
runs one forward + backward, and reports peak RSS (VmHWM) minus the RSS just before:
the extra memory the loss needs, which includes the bfloat16 gradient w.r.t. the student
logits (the same size in both variants). Where the counter cannot be reset, ru_maxrss is
used and the figure is marked ``*`` (an upper bound that includes input construction).
``--all-scored`` scores every token instead (no prompt/padding to skip), isolating the
effect of chunking from that of skipping unscored positions.

Time: the fastest of the memory run and ``--repeats`` further runs of forward + backward,
wall clock and process CPU time (all threads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Child process: one variant, one configuration
# ----------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (VmRSS now, VmHWM its peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _naive_loss(student, teacher, mask, loss_name: str, temperature: float):
    """Full-logits float32 implementation, as in the reference code (DistiLLM-style)."""
    import torch

    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if loss_name == "fkl":
        per_token = -(p * log_q).sum(-1)
    elif loss_name == "jsd":
        m = 0.1 * p + 0.9 * q
        log_m = torch.log(m)
        per_token = 0.9 * (q * (log_q - log_m)).sum(-1) + 0.1 * (p * (log_p - log_m)).sum(-1)
    elif loss_name == "rkl":
        per_token = (q * (log_q - log_p)).sum(-1)
    else:
        raise ValueError(f"naive variant implements fkl, jsd, rkl only, not {loss_name!r}")
    m = mask.float()
    return temperature**2 * (per_token * m).sum() / m.sum()


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from srd_distill.losses import kd_divergence, resolve_chunk_size

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    b, s, v = args.batch, args.seq, args.vocab
    # Build the bfloat16 inputs one sequence at a time: no full float32 temporaries.
    student = torch.empty(b, s, v, dtype=torch.bfloat16)
    teacher = torch.empty(b, s, v, dtype=torch.bfloat16)
    for i in range(b):
        student[i] = torch.randn(s, v, generator=gen) * 3
        teacher[i] = torch.randn(s, v, generator=gen) * 3
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        prompt = int(torch.randint(64, 256, (1,), generator=gen))
        end = s - int(torch.randint(0, s // 8, (1,), generator=gen))  # right padding
        mask[i, prompt:end] = True
    if args.all_scored:
        mask[:] = True
    student.requires_grad_(True)

    def step() -> float:
        if args.variant == "naive":
            loss = _naive_loss(student, teacher, mask, args.loss, args.temperature)
        else:
            loss = kd_divergence(student, teacher, mask, args.loss, args.temperature, "all", args.chunk_size)
        loss.backward()
        return float(loss)

    exact = _reset_peak_rss()
    before = proc_status_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    value = step()
    times, cpu_times = [time.perf_counter() - t0], [time.process_time() - c0]
    peak = proc_status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    student.grad = None

    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        student.grad = None
    print(
        json.dumps(
            {
                "vocab": v,
                "tokens": b * s,
                "scored": int(mask.sum()),
                "loss": args.loss,
                "variant": args.variant,
                "value": value,
                # The fastest run: on a shared machine slower runs measure the neighbours.
                "time_s": min(times),
                "cpu_s": min(cpu_times),
                "extra_mib": (peak - before) / 1024,
                "inputs_mib": 2 * student.numel() * student.element_size() / 2**20,
                "exact_peak": exact,
                "chunk": resolve_chunk_size(args.chunk_size, v),
            }
        )
    )


# ----------------------------------------------------------------------------------------
# Parent: run every configuration in a fresh child and print the table
# ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--losses", nargs="+", default=["fkl", "jsd"], help="fkl, jsd or rkl")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: automatic (on the CPU about 2**20 / vocab)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the memory run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads made timings erratic)",
    )
    parser.add_argument("--all-scored", action="store_true", help="score every token (no prompt or padding)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    print(
        f"KD loss forward+backward, bf16 logits, batch {args.batch} x seq {args.seq}, T={args.temperature}, "
        f"torch {torch.__version__}, threads={args.threads}, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'vocab':>7} {'tokens (scored)':>16} {'loss':>5} {'variant':>8} {'chunk':>6} {'time (s)':>9} "
        f"{'cpu (s)':>8} {'peak extra (MiB)':>17} {'naive/chunked mem':>18} {'naive/chunked time':>19}"
    )
    print(header)
    print("-" * len(header))
    for vocab in args.vocabs:
        for loss in args.losses:
            rows = {}
            for variant in ("naive", "chunked"):
                cmd = [
                    sys.executable, __file__, "--child", "--vocab", str(vocab), "--loss", loss,
                    "--variant", variant, "--batch", str(args.batch), "--seq", str(args.seq),
                    "--temperature", str(args.temperature), "--repeats", str(args.repeats),
                    "--threads", str(args.threads),
                ] + (["--all-scored"] if args.all_scored else [])  # fmt: skip
                if args.chunk_size is not None:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{vocab:>7} {loss:>5} {variant:>8}: failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
                    continue
                rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            if len(rows) == 2:
                naive, chunked = rows["naive"], rows["chunked"]
                rel = abs(naive["value"] - chunked["value"]) / max(abs(naive["value"]), 1e-12)
                assert rel < 1e-3, f"variants disagree: {naive['value']} vs {chunked['value']}"
            for variant, r in rows.items():
                mark = "" if r["exact_peak"] else "*"
                chunk = "-" if variant == "naive" else str(r["chunk"])
                ratios = ("", "")
                if variant == "chunked" and len(rows) == 2:
                    n = rows["naive"]
                    ratios = (f"{n['extra_mib'] / r['extra_mib']:.1f}x", f"{n['time_s'] / r['time_s']:.1f}x")
                tokens = f"{r['tokens']} ({r['scored']})"
                print(
                    f"{vocab:>7} {tokens:>16} {loss:>5} {variant:>8} {chunk:>6} {r['time_s']:>9.2f} {r['cpu_s']:>8.2f} "
                    f"{r['extra_mib']:>16.0f}{mark:1} {ratios[0]:>18} {ratios[1]:>19}"
                )
            sys.stdout.flush()
    print(
        "time = fastest wall-clock seconds of forward+backward over 1 + --repeats runs; cpu = process CPU seconds (all threads), fastest run."
    )
    print(
        "peak extra = peak RSS during one forward+backward minus RSS after building the inputs; it includes the "
        "bf16 gradient w.r.t. the student logits (batch x seq x vocab x 2 bytes) that both variants must return."
    )


if __name__ == "__main__":
    main()
