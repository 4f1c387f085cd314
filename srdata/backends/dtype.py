"""Which device and dtype a run computes in: ``--device auto`` and ``--dtype auto`` resolved.

The rule for ``--dtype auto`` (:func:`auto_dtype`):

* **GPU**: bfloat16 (vLLM, and transformers on CUDA).
* **CPU with a fast bfloat16 path**: bfloat16. torch reports it with
  ``torch.cpu._is_amx_tile_supported()`` (AMX, Intel Sapphire Rapids and later) or
  ``torch.cpu._is_avx512_bf16_supported()`` (AVX512-BF16: Intel Cooper Lake, AMD Zen 4
  and later); oneDNN then runs bfloat16 matmuls natively. Measured on an AMD EPYC with
  AVX512-BF16 and no AMX, 2048x2048 matmul: 95 vs 205 GFLOP/s (one core), 141 vs
  407 GFLOP/s (two cores) in float32 vs bfloat16; the issue measured 177 vs 1,270 on one
  core of an AMX Xeon. On real rows (SmolLM2-135M-Instruct, held-out T0 rows,
  ``benchmarks/bench_dtype.py``), the rankings agree with float32 closely (Spearman of
  ce_loss >= 0.99, difficulty_rank >= 0.95; see benchmarks/README.md), while greedy outputs
  differ on many rows: pass ``--dtype float32`` for outputs comparable with a float32 run.
* **Any other CPU**: float32. Without those instructions bfloat16 matmuls are emulated
  (converted to float32 and back), slower than float32 and less exact.

Example:
    >>> auto_dtype("cpu", CpuBfloat16(amx=False, avx512_bf16=False))[0]
    torch.float32
    >>> auto_dtype("cpu", CpuBfloat16(amx=True, avx512_bf16=True))[0]
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
        >>> auto_dtype("cpu", CpuBfloat16(amx=False, avx512_bf16=True))
        (torch.bfloat16, 'auto: this CPU runs bfloat16 matmuls natively (AVX512-BF16); pass --dtype float32 for float32-exact values')
    """
    if device_type == "cuda":
        return torch.bfloat16, "auto: bfloat16 on a GPU"
    if device_type != "cpu":
        return torch.float32, f"auto: float32 on {device_type}"
    if cpu.fast():
        path = "AMX" if cpu.amx else "AVX512-BF16"
        return torch.bfloat16, f"auto: this CPU runs bfloat16 matmuls natively ({path}); pass --dtype float32 for float32-exact values"
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
    """``auto`` is bfloat16 on GPUs and on CPUs with native bfloat16 matmuls, else float32.

    Example:
        >>> resolve_dtype("bfloat16", torch.device("cpu"))
        torch.bfloat16
    """
    return resolve_dtype_with_reason(dtype, device)[0]
