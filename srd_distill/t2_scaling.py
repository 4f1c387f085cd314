"""Which KD losses are multiplied by T^2, the square of the distillation temperature.

Example:
    >>> t2_factor("rkl", 2.0, "reference"), t2_factor("rkl", 2.0, "all"), t2_factor("fkl", 2.0, "none")
    (1.0, 4.0, 1.0)
"""

from __future__ import annotations

from typing import Literal, get_args

from srd_distill.divergences import check_loss_name

__all__ = [
    "T2Scaling",
    "T2_SCALING_MODES",
    "REFERENCE_T2_LOSSES",
    "DEFAULT_T2_SCALING",
    "check_t2_scaling",
    "t2_factor",
]

T2Scaling = Literal["reference", "all", "none"]
T2_SCALING_MODES: tuple[str, ...] = get_args(T2Scaling)

#: The losses that the authors' code multiplies by T^2 (``t2_scaling="reference"``).
REFERENCE_T2_LOSSES: frozenset[str] = frozenset({"fkl", "jsd", "srkl"})

#: ``"all"``: every loss is multiplied by T^2. Why: the gradient of a soft-target loss
#: w.r.t. the logits shrinks roughly like 1/T^2 as T grows (Hinton et al., 2015), so the
#: T^2 factor keeps the KD term's weight against the T=1 cross-entropy roughly constant
#: while the curriculum raises T from stage to stage (1 -> 1.5 -> 2), and it does so for
#: every loss alike, so losses stay comparable. The reference code applies the factor to
#: fkl, jsd and srkl only; use ``"reference"`` to reproduce the paper's numbers exactly.
#: At T = 1 (the first stage) all three modes agree.
DEFAULT_T2_SCALING: T2Scaling = "all"


def check_t2_scaling(t2_scaling: str) -> None:
    """Raise a ValueError naming the valid modes when ``t2_scaling`` is not one.

    Example:
        >>> check_t2_scaling("some")
        Traceback (most recent call last):
        ValueError: unknown t2_scaling 'some'; valid modes: reference, all, none
    """
    if t2_scaling not in T2_SCALING_MODES:
        raise ValueError(f"unknown t2_scaling {t2_scaling!r}; valid modes: {', '.join(T2_SCALING_MODES)}")


def t2_factor(loss_name: str, temperature: float, t2_scaling: str = DEFAULT_T2_SCALING) -> float:
    """The factor the divergence ``loss_name`` is multiplied by at ``temperature``.

    Example:
        >>> t2_factor("fkl", 1.5, "reference"), t2_factor("tvd", 1.5, "reference")
        (2.25, 1.0)
    """
    check_loss_name(loss_name)
    check_t2_scaling(t2_scaling)
    if t2_scaling == "all" or (t2_scaling == "reference" and loss_name in REFERENCE_T2_LOSSES):
        return float(temperature) ** 2
    return 1.0
