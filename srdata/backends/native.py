"""srdata's native CPU kernels: how they are built and loaded, and the first of them, a decode step's attention over a bfloat16 KV cache.

Why: on a bf16 decode step (one query token per row) torch's CPU flash kernel spends its
time per (row, head), reading the cache at ~3 GB/s where a plain read runs at ~20 GB/s; on
SmolLM2 that was 35% of the decode phase (benchmarks/README.md, "Decode on a CPU").
``kernels/decode_attention.c`` reads each row's visible keys once per KV head for all the
query heads that share it, with AVX512-BF16 dot products summed in float32 and the
softmax in float32: 3-4x faster per layer on this project's CPU, errors against a float64
reference no larger than the flash kernel's. vLLM's CPU attention kernels need its paged
cache layout, and ``torch.compile`` gained 1.1-1.3x for a 4-13 s compile per process.

Build: on first use the C file is compiled with the system C compiler (``$CC``, else ``cc``
or ``gcc``) into ``$SRDATA_KERNEL_CACHE`` (default ``~/.cache/srdata/kernels``), named by a
hash of the source, compiler and flags; it is written under a temp name and renamed, so
processes compiling at once each end with a complete file. Each process then checks the
kernel once against a float64 reference on random rows before any model uses it.

Not used (torch's kernel runs instead; one log line says why): a CPU without AVX512-BF16,
no C compiler, a failed build or check, or ``SRDATA_NATIVE_KERNELS=0``.

Example:
    >>> out = decode_attention(query, key, value, mask, scale=0.125)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

from srdata.backends.dtype import cpu_bfloat16

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")  # the C sources (and their shared header, simd.h)
SOURCE = KERNELS / "decode_attention.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-shared", "-fPIC")
DISABLE_ENV, CACHE_ENV = "SRDATA_NATIVE_KERNELS", "SRDATA_KERNEL_CACHE"
#: The kernel's largest error on the load check, relative to the largest output (the flash kernel: ~2.5e-3).
CHECK_TOLERANCE = 8e-3


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or ``None``."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    if not cpu_bfloat16().avx512_bf16:  # torch's own query, as for --dtype auto (CPUs with it have AVX512BW/VL too)
        return "the CPU lacks AVX512-BF16 (as torch reports it)"
    if compiler() is None:
        return "no C compiler ($CC, cc or gcc) on PATH"
    return None


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``, else ``gcc`` (``None`` when none is on PATH)."""
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def build(cache: Path | None = None, source: Path | None = None) -> Path:
    """Compile ``source`` (default: the decode attention kernel) unless this source, its headers, compiler and flags
    were compiled already; returns the library's path.

    Raises ``RuntimeError`` with the compiler's message when it fails.
    """
    from srdata.run.io import temp_path

    source = Path(source or SOURCE)
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler ($CC, cc or gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what the source may include
    key = hashlib.sha256("\0".join([source.read_text(), *headers, cc, version, *FLAGS]).encode()).hexdigest()[:16]
    folder = Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "srdata" / "kernels")
    library = folder / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(library)
    done = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed on {source.name}: {done.stderr.strip()[-600:]}")
    os.replace(tmp, library)
    return library


def load(source: Path, symbol: str, argtypes: list[Any], check: Callable[[Any], float], tolerance: float, what: str) -> Any | None:
    """Build ``source``, load its function ``symbol`` and check it (``check(function)`` <= ``tolerance``); ``None``,
    logged once by the caller's cache, where it cannot be used. ``what`` names the kernel in the log lines.

    Example:
        >>> load(KERNELS / "kd_fkl.c", "srdata_kd_fkl_bf16", ARGTYPES, check_error, 1e-5, "KD loss")  # doctest: +SKIP
    """
    reason = unavailable_reason()
    if reason is None:
        try:
            function = getattr(ctypes.CDLL(str(build(source=source))), symbol)
            function.restype = ctypes.c_int
            function.argtypes = argtypes
            error = check(function)
            if error <= tolerance:
                log.info("%s: srdata's AVX512-BF16 kernel (load check: error %.1e)", what, error)
                return function
            reason = f"its load check failed (error {error:.1e} > {tolerance:.0e})"
        except (OSError, RuntimeError, AttributeError) as err:
            fix = f"set {CACHE_ENV} to a writable folder, or " if isinstance(err, OSError) else ""
            reason = f"{err} ({fix}{DISABLE_ENV}=0 stops trying)"
        # This CPU could run the kernel and it failed: worth a warning (the torch path it falls back to is slower).
        log.warning("%s: torch's ops (srdata's native kernel failed: %s)", what, reason)
        return None
    log.info("%s: torch's ops (srdata's native kernel unavailable: %s)", what, reason)
    return None


@functools.lru_cache(maxsize=1)
def kernel() -> Any | None:
    """The checked decode attention kernel, or ``None`` (logged once) where it cannot be used."""
    argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]
    return load(SOURCE, "srdata_decode_attention_bf16", argtypes, check_error, CHECK_TOLERANCE, "decode attention")


def name(device: Any, dtype: Any) -> str:
    """Which kernel a decode step's attention uses for a model on ``device`` in ``dtype`` (for manifests).

    Example:
        >>> name("cpu", torch.float32)
        'torch'
    """
    usable = torch.device(device).type == "cpu" and dtype == torch.bfloat16 and kernel() is not None
    return "srdata-avx512-bf16" if usable else "torch"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """Attention of ``query`` ``[rows, kv_heads, groups, dim]`` over ``key``/``value`` ``[rows, kv_heads, keys, dim]``.

    ``mask`` is a boolean ``[rows, 1, 1, keys]`` (True = visible) or ``None``. Returns
    ``[rows, kv_heads, groups, dim]``, or ``None`` where the kernel does not apply (another
    dtype or device, a layout it does not read, a row that sees no key): the caller then
    uses torch's kernel.
    """
    function = kernel() if query.device.type == "cpu" and query.dtype == torch.bfloat16 else None
    rows, kv_heads, groups, dim = query.shape
    keys = key.shape[2]
    if (
        function is None or key.dtype != query.dtype or value.dtype != query.dtype or dim not in (64, 128)
        or key.shape != value.shape or key.stride() != value.stride() or key.stride()[2:] != (dim, 1)
        or key.shape[:2] != (rows, kv_heads)
    ):
        return None
    if mask is None:
        visible = torch.ones(rows, keys, dtype=torch.uint8)
    elif mask.dtype == torch.bool and mask.shape == (rows, 1, 1, keys):
        visible = mask.reshape(rows, keys).contiguous().view(torch.uint8)  # bool is one byte, 0 or 1
    else:
        return None
    return _launch(function, query.contiguous(), key, value, visible, scale, torch.get_num_threads())


def _launch(function: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
            scale: float, threads: int) -> torch.Tensor | None:
    """One kernel call on tensors already checked for it (``visible``: ``[rows, keys]`` bytes); ``None`` if it declined."""
    rows, kv_heads, groups, dim = query.shape
    out = torch.empty_like(query)
    status = function(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), visible.data_ptr(), out.data_ptr(),
        rows, kv_heads, groups, dim, key.shape[2], key.stride(0), key.stride(1), float(scale), threads,
    )
    return out if status == 0 else None


def check_error(function: Any) -> float:
    """The kernel's largest error against float64 on random left-padded rows, relative to the largest output."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for dim, groups in ((64, 3), (128, 7)):
        rows, kv_heads, keys = 5, 2, 45
        q, k, v = (torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in
                   ((rows, kv_heads, groups, dim), (rows, kv_heads, keys, dim), (rows, kv_heads, keys, dim)))
        mask = torch.zeros(rows, 1, 1, keys, dtype=torch.bool)
        for row in range(rows):
            mask[row, ..., 7 * row : keys - 3] = True
        out = _launch(function, q, k, v, mask.reshape(rows, keys).view(torch.uint8), dim**-0.5, 1)
        if out is None:
            return float("inf")
        scores = (q.double() @ k.double().transpose(-1, -2) * dim**-0.5).masked_fill(~mask, float("-inf"))
        exact = torch.softmax(scores, -1) @ v.double()
        worst = max(worst, float((out.double() - exact).abs().max() / exact.abs().max()))
    return worst
