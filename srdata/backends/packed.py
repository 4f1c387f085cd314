"""Linear layers on oneDNN-packed weights, for CPU inference where they compute the same numbers.

A decode step multiplies a few dozen rows by every weight matrix; with the weights in
their plain row-major layout, oneDNN reorders each one into its blocked layout on every
call. Reordered once ("packed", as torch's inductor does when it freezes a CPU model), the
same bfloat16 products ran 1.13-1.6x faster on this project's CPU (AVX512-BF16, 1 thread:
576 -> 1536 at 32 rows 117 -> 132-165 GFLOP/s, the 49,152-word LM head 123 -> 166;
prompt-sized matmuls about 1.1x) and gave bit-identical results. In float32 the packed
kernels sum in another order (differences of ~1e-4 on the same products), so a one-off
check on random rows keeps packing off wherever the results are not identical: float32
runs, and the parity tests that use it, are unchanged.

The packed copies are kept beside the weights (the LM head's weight is also the input
embedding, and scoring reads it): about one more copy of the linear weights in memory.

Example:
    >>> use_packed_linears(model, batch_hint=64)  # doctest: +SKIP
    211
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _ops() -> tuple[Any, Any] | None:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return mkldnn._reorder_linear_weight, mkldnn._linear_pointwise  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None


def packs_identically(dtype: torch.dtype, in_features: int = 576, out_features: int = 1536) -> bool:
    """Whether a packed linear gives exactly ``F.linear``'s result in ``dtype`` on this CPU (rows 1, 7 and 64)."""
    ops = _ops()
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    reorder, linear = ops
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    try:
        with torch.inference_mode():
            packed = reorder(weight, 64)
            for rows in (1, 7, 64):
                x = torch.randn(2, rows, in_features, generator=generator).to(dtype)
                for b in (None, bias):
                    if not torch.equal(linear(x, packed, b, "none", [None], ""), torch.nn.functional.linear(x, weight, b)):
                        return False
    except RuntimeError as err:  # a torch build without these kernels for this dtype
        log.info("packed linear weights unavailable for %s (%s)", dtype, err)
        return False
    return True


def use_packed_linears(model: Any, batch_hint: int = 64) -> int:
    """Run ``model``'s ``nn.Linear`` layers on packed weights when that is exact here; returns how many were switched.

    Only for inference on the CPU: the packed call has no autograd. Models on other
    devices, or in a dtype where :func:`packs_identically` fails, are left as they are;
    each layer shape is also checked once on its own weights (oneDNN picks kernels by
    shape), and shapes whose results differ stay unpacked.
    """
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu" or not packs_identically(weight.dtype):
        return 0
    reorder, linear = _ops()  # type: ignore[misc]
    switched = 0
    exact_for_shape: dict[tuple[int, int, bool], bool] = {}  # kernels differ by shape: each shape checked on its own weights
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for module in model.modules():
            if type(module) is not torch.nn.Linear or module.weight.dtype != weight.dtype:
                continue
            shape = (module.in_features, module.out_features, module.bias is not None)
            if exact_for_shape.get(shape) is False:
                continue
            packed = reorder(module.weight.detach(), batch_hint)
            if shape not in exact_for_shape:
                x = torch.randn(2, 7, module.in_features, generator=generator).to(weight.dtype)
                exact_for_shape[shape] = all(
                    torch.equal(linear(rows, packed, module.bias, "none", [None], ""), torch.nn.functional.linear(rows, module.weight, module.bias))
                    for rows in (x[:, :1], x, x.reshape(1, 14, -1))
                )
            if exact_for_shape[shape]:
                module.forward = _packed_forward(module, linear, packed)
                switched += 1
    log.info("%d linear layers run on packed %s weights", switched, weight.dtype)
    return switched


def _packed_forward(module: torch.nn.Linear, linear: Any, packed: torch.Tensor) -> Any:
    """``module``'s forward on ``packed``, a copy of its weight as it was when packed.

    The copy is only used while it is provably that weight: the same tensor, not changed in
    place since (its version counter), and no gradient wanted (the packed call has no
    autograd). Otherwise (weights loaded or trained after packing) the plain ``F.linear``
    runs, so a stale copy can never answer.
    """
    weight, version = module.weight, module.weight._version

    def forward(x: torch.Tensor) -> torch.Tensor:
        current = module.weight
        if current is not weight or current._version != version or (torch.is_grad_enabled() and current.requires_grad):
            return torch.nn.functional.linear(x, current, module.bias)
        return linear(x, packed, module.bias, "none", [None], "")

    forward.packed_weight = packed  # marks what this module installed (prefill_check's float32 copy drops only these)
    return forward


def installed_packed_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs a forward :func:`use_packed_linears` installed (not one another library set).

    Example:
        >>> installed_packed_forward(torch.nn.Linear(2, 2))
        False
    """
    return hasattr(module.__dict__.get("forward"), "packed_weight")
