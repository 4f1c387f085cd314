"""Which device and dtype a run computes in: ``--device auto`` and ``--dtype auto`` resolved.

The rule for ``--dtype auto`` (:func:`auto_dtype`), the same for ``srdata score``/``teach``
and ``srd-distill`` (a student is scored and trained in one precision):

* **GPU**: bfloat16 (vLLM, and transformers on CUDA).
* **CPU with AMX** (``torch.cpu._is_amx_tile_supported()``: Intel Sapphire Rapids and later):
  bfloat16. Measured in issue 28 on one core of an AMX Xeon: 2048x2048 matmul 177 vs
  1,270 GFLOP/s, decode-shaped linear 151 vs 568 GFLOP/s (float32 vs bfloat16); scoring
  with generation 2.37x faster end to end.
* **CPU with AVX512-BF16 but no AMX** (AMD Zen 4/5, Intel Cooper Lake): bfloat16. Measured
  on an AMD EPYC (benchmarks/README.md): matmuls ~2x float32 (2048x2048: 95 vs 205 GFLOP/s on
  one core); scoring with 32 new tokens 1.89x end to end at 1 thread and 1.86x at 2 threads,
  an srd-distill step 1.40x, with the agreement bounds below met. (Until srdata's bfloat16
  generation kept the shared prompt prefill it ran at 0.9x there, and this rule said float32.)
* **Any other CPU**: float32: without AVX512-BF16 or AMX bfloat16 matmuls are emulated,
  slower than float32 and less exact.

What bfloat16 changes (SmolLM2-135M-Instruct, 128 held-out rows, ``benchmarks/bench_dtype.py``):
Spearman of ce_loss 0.999, difficulty_rank 0.96 (``paper``) / 0.999 (``noisy``), dropped
quarter 30/32 and 32/32 rows shared, greedy outputs identical on 78 of 128 rows: pass
``--dtype float32`` where outputs must match a float32 run.

Example:
    >>> auto_dtype("cpu", CpuBfloat16(amx=False, avx512_bf16=False))[0]
    torch.float32
    >>> auto_dtype("cpu", CpuBfloat16(amx=True, avx512_bf16=True))[0]
    torch.bfloat16
    >>> auto_dtype("cpu", CpuBfloat16(amx=False, avx512_bf16=True))[0]
    torch.bfloat16
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DTYPES", "CpuBfloat16", "cpu_bfloat16", "auto_dtype", "resolve_device", "resolve_dtype", "resolve_dtype_with_reason"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CpuBfloat16(NamedTuple):
    """Which native bfloat16 matmul paths this CPU has, as torch reports them."""

    amx: bool
    avx512_bf16: bool

    def fast(self) -> bool:
        """True when oneDNN runs bfloat16 matmuls natively (AMX or AVX512-BF16)."""
        return self.amx or self.avx512_bf16


def _torch_flag(name: str) -> bool:
    # Private torch.cpu queries (torch >= 2.3); a torch without them counts as "no fast
    # path", which keeps float32: slower at worst, never less exact.
    query = getattr(torch.cpu, name, None)
    try:
        return bool(query()) if query is not None else False
    except RuntimeError:
        return False


def cpu_bfloat16() -> CpuBfloat16:
    """This CPU's native bfloat16 paths, from torch's own capability queries (not /proc/cpuinfo).

    Example:
        >>> isinstance(cpu_bfloat16().fast(), bool)
        True
    """
    return CpuBfloat16(amx=_torch_flag("_is_amx_tile_supported"), avx512_bf16=_torch_flag("_is_avx512_bf16_supported"))


def auto_dtype(device_type: str, cpu: CpuBfloat16) -> tuple[torch.dtype, str]:
    """What ``--dtype auto`` means on ``device_type`` given the CPU's bfloat16 paths, and why.

    A pure function of its inputs, so the rule is testable for any CPU.

    Example:
        >>> auto_dtype("cpu", CpuBfloat16(amx=True, avx512_bf16=True))
        (torch.bfloat16, 'auto: this CPU has AMX (fast bfloat16 matmuls); pass --dtype float32 for float32-exact values')
    """
    if device_type == "cuda":
        return torch.bfloat16, "auto: bfloat16 on a GPU"
    if device_type != "cpu":
        return torch.float32, f"auto: float32 on {device_type}"
    if cpu.amx:
        return torch.bfloat16, "auto: this CPU has AMX (fast bfloat16 matmuls); pass --dtype float32 for float32-exact values"
    if cpu.avx512_bf16:
        return torch.bfloat16, ("auto: this CPU has AVX512-BF16 (native bfloat16 matmuls, faster end to end than float32); "
                                "pass --dtype float32 for float32-exact values")
    return torch.float32, "auto: this CPU has no native bfloat16 matmuls (no AMX or AVX512-BF16), so float32 is faster"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype_with_reason(dtype: str, device: torch.device, cpu: CpuBfloat16 | None = None) -> tuple[torch.dtype, str]:
    """The dtype ``dtype`` means on ``device`` and a few words on why (``auto``: :func:`auto_dtype`).

    Example:
        >>> resolve_dtype_with_reason("float32", torch.device("cpu"))
        (torch.float32, 'as asked (--dtype float32)')
    """
    if dtype == "auto":
        return auto_dtype(device.type, cpu if cpu is not None else cpu_bfloat16())
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype], f"as asked (--dtype {dtype})"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs and on CPUs with AMX or AVX512-BF16, else float32 (:func:`auto_dtype`).

    Example:
        >>> resolve_dtype("bfloat16", torch.device("cpu"))
        torch.bfloat16
    """
    return resolve_dtype_with_reason(dtype, device)[0]
