"""Matmul peaks per dtype and model FLOP counts, shared by bench_score.py, bench_distill.py and bench_dtype.py.

"% of peak" is always against the peak of the dtype the arm computes in: a bfloat16 arm
against the bfloat16 matmul peak (AMX or AVX512-BF16 make it 2-7x the float32 one), a
float32 arm against the float32 peak.

Example:
    >>> peaks = matmul_peaks(reps=2, size=256)
    >>> sorted(peaks)
    ['bfloat16', 'float32']
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # srdata from this checkout


def matmul_peak(reps: int, size: int = 2048, dtype: str = "float32") -> float:
    """Best-of-``reps`` throughput of a ``size x size`` matmul in ``dtype``, in GFLOP/s."""
    import torch

    a = torch.randn(size, size).to(getattr(torch, dtype))
    b = torch.randn(size, size).to(getattr(torch, dtype))
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def matmul_peaks(reps: int = 10, size: int = 2048) -> dict[str, float]:
    """``{"float32": GFLOP/s, "bfloat16": GFLOP/s}`` of a 2048x2048 matmul, best of ``reps`` each."""
    return {dtype: matmul_peak(reps, size, dtype) for dtype in ("float32", "bfloat16")}


def best_peaks(*measured: dict[str, float]) -> dict[str, float]:
    """The best of several :func:`matmul_peaks` results (start and end of a run), per dtype."""
    return {dtype: max(m[dtype] for m in measured) for dtype in measured[0]}


def cpu_line() -> str:
    """What torch reports about this CPU's bfloat16 paths, and the load average, for the record."""
    import os

    from srdata.backends.dtype import cpu_bfloat16

    cpu = cpu_bfloat16()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU: AMX {'yes' if cpu.amx else 'no'}, AVX512-BF16 {'yes' if cpu.avx512_bf16 else 'no'}; load average {load}"


def non_embedding_params(model) -> int:
    """Parameters outside the token/position embeddings and the output layer."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None for p in m.parameters()}
    for name, module in model.named_modules():
        if name.endswith(("wpe", "embed_positions")):
            skip |= {id(p) for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def training_step_flop(student, teacher, tokens: int, scored: int) -> float:
    """FLOPs of one KD step on ``tokens`` real tokens of which ``scored`` are scored (padding not counted).

    Student forward + backward = 6 x non-embedding parameters per token, plus its LM head
    (6 x hidden x vocabulary) per scored token; teacher forward = 2 x its non-embedding
    parameters per token plus 2 x hidden x vocabulary per scored token. Attention's own
    score/value matmuls are left out (small at these widths), so the figure is a floor.
    """
    def head(model) -> int:
        return model.config.hidden_size * model.config.vocab_size

    student_flop = 6 * non_embedding_params(student) * tokens + 6 * head(student) * scored
    teacher_flop = 2 * non_embedding_params(teacher) * tokens + 2 * head(teacher) * scored
    return float(student_flop + teacher_flop)
