"""What the one-off shared-prefill check compares, and on which copy of the model.

The transformers backend scores a reference as a continuation of its prompt's cache and
decodes from the same cache (one prompt pass, not two). Before it trusts that path for a
model, it runs two made-up rows both ways and compares (``HFBackend._shared_prefill_matches``).

In float32 the two ways agree to ~1e-7, so a 1e-3 tolerance catches even a position off
by one (0.4-3% on the check's rows). In bfloat16 they round differently (0.56% on
SmolLM2's check rows with nothing wrong), so a 16-bit model's own check can only refuse
gross gaps. The positions are therefore checked on a float32 copy of the same weights
(bfloat16 -> float32 is exact): the same code and cache layout at a tolerance that sees
an off-by-one. Where memory is too short for that copy, the check says so in the log and
keeps only the 16-bit comparison.

Example:
    >>> shared_prefill_tolerance(torch.float32), shared_prefill_tolerance(torch.bfloat16)
    (0.001, 0.015625)
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from srdata.backends.packed import installed_packed_forward

log = logging.getLogger(__name__)


def shared_prefill_tolerance(dtype: torch.dtype) -> float:
    """Relative loss gap allowed between the shared-prefill and separate passes in ``dtype``.

    Sixteen-bit dtypes get twice their machine epsilon (bfloat16: 1.6%), which refuses
    caches that cannot be shared at all (errors or gross gaps) but not an off-by-one
    position; :func:`float32_copy` gives the check a model where 1e-3 applies.

    Example:
        >>> shared_prefill_tolerance(torch.float16)
        0.001953125
    """
    return max(1e-3, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (host RAM for the CPU), or None if unknown.

    Example:
        >>> available_memory(torch.device("cpu")) > 0  # doctest: +SKIP
        True
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:  # MemAvailable counts reclaimable page cache; free pages alone would undercount
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def float32_copy(model: Any, *, headroom: float = 1.25) -> Any | None:
    """A float32 copy of a 16-bit ``model`` (same weights, exactly), or None where memory is short or it cannot be copied.

    The copy shares nothing with ``model``: casting the model itself up and back down
    would also cast buffers transformers keeps in float32 (rotary ``inv_freq``). Packed
    forwards srdata installed on the original's modules (packed.py) are dropped from the
    copy, since they hold the original's 16-bit weights; forwards set by anything else stay.

    Example:
        >>> twin = float32_copy(model)  # doctest: +SKIP
        >>> next(twin.parameters()).dtype  # doctest: +SKIP
        torch.float32
    """
    params = list(model.parameters())  # tied weights once (parameters() skips repeats)
    device = params[0].device
    needed = headroom * sum(p.numel() for p in params) * 4  # float32 bytes
    free = available_memory(device)
    if free is None or free < needed:
        known = "unknown" if free is None else f"{free / 2**30:.1f} GiB"
        log.warning(
            "no float32 copy for the shared-prefill check (needs %.1f GiB, %s free): positions are checked "
            "at the 16-bit tolerance only", needed / 2**30, known,
        )
        return None
    try:
        twin = copy.deepcopy(model)
    except Exception as err:  # a model object that cannot be copied (hooks, handles): say so, as for memory
        log.warning("no float32 copy for the shared-prefill check (%s: %s): positions are checked at the 16-bit "
                    "tolerance only", type(err).__name__, err)
        return None
    for module in twin.modules():
        if installed_packed_forward(module):  # holds the original's 16-bit weights; other overrides are the model's
            del module.forward
    return twin.float()
