"""Testbed regimes: which part of the data the teacher can do, and how noisy the references are.

The testbed of :mod:`srdata.demo.testbed` can be built in two regimes:

``teachable`` (the default, the testbed as first designed)
    four families (copy, reverse, shift, sort) that the student cannot all do yet and the
    teacher does perfectly; 10% misaligned references. The student's hardest quarter is
    fully teachable: dropping it removes signal that KD can transfer.

``paper`` (the regime the SRD paper's method was built for)
    the same four families plus three families that are beyond the student and only
    partly known to a teacher of the testbed's size (``add``, ``count``, ``extract``: the
    4-layer teacher stayed at 17-55% exact match on them when the testbed was designed),
    and 20% misaligned references. The student's hardest quarter is then mostly rows the
    teacher gets wrong or rows whose reference is wrong, as in the paper's Dolly setting
    (teacher ROUGE-L 27 on the hardest part, noisy references).

========  =================================  ==========  =================================
task      prompt (level 2 example)           response    difficulty knob (level 1..4)
========  =================================  ==========  =================================
add       ``add 3 4 3 + 9``                  ``2 5 3``   level+1 digits, least significant first
count     ``count b : a b c b e``            ``2``       level+3 letters from a..e
extract   ``extract 3 : k d w p q``          ``w``       level+3 letters, the K-th asked
========  =================================  ==========  =================================

This module holds the two extra families and the regime table; it imports nothing from
the testbed (the testbed imports it).

Example:
    >>> import random
    >>> make_count(1, random.Random(0))
    ('count e : d d a c\\n', '0')
    >>> REGIMES["paper"]["noise_fraction"], REGIMES["paper"]["tasks"][-3:]
    (0.2, ('add', 'count', 'extract'))
"""

from __future__ import annotations

import random
from typing import Any, Callable

__all__ = ["REGIMES", "REGIME_NAMES", "EXTRA_MAKERS", "EXTRA_TASK_TABLE", "HARD_TASKS", "make_count", "make_extract", "regime_settings"]

COUNT_LETTERS = "abcde"  # few letters, so a count above 1 is common
EXTRACT_LETTERS = "abcdefghijklmnopqrstuvwxyz"

#: The families of the ``paper`` regime that are beyond the student and imperfectly known to the teacher.
HARD_TASKS: tuple[str, ...] = ("add", "count", "extract")

#: Each regime's task families and reference-noise rate (every other setting comes from the spec).
REGIMES: dict[str, dict[str, Any]] = {
    "teachable": {"tasks": ("copy", "reverse", "shift", "sort"), "noise_fraction": 0.10},
    "paper": {"tasks": ("copy", "reverse", "shift", "sort", *HARD_TASKS), "noise_fraction": 0.20},
}
REGIME_NAMES: tuple[str, ...] = tuple(REGIMES)


def make_count(level: int, rng: random.Random) -> tuple[str, str]:
    """How often a letter occurs among level+3 letters from a..e.

    Example:
        >>> make_count(2, random.Random(1))
        ('count d : b e a c a\\n', '0')
    """
    letters = [rng.choice(COUNT_LETTERS) for _ in range(level + 3)]
    target = rng.choice(COUNT_LETTERS)
    return f"count {target} : {' '.join(letters)}\n", str(letters.count(target))


def make_extract(level: int, rng: random.Random) -> tuple[str, str]:
    """The K-th of level+3 letters (K written as a digit, 1-based).

    Example:
        >>> make_extract(2, random.Random(2))
        ('extract 3 : b c c l f\\n', 'c')
    """
    letters = [rng.choice(EXTRACT_LETTERS) for _ in range(level + 3)]
    k = rng.randrange(len(letters)) + 1
    return f"extract {k} : {' '.join(letters)}\n", letters[k - 1]


#: Makers of the families this module adds (``add`` lives in the testbed module).
EXTRA_MAKERS: dict[str, Callable[[int, random.Random], tuple[str, str]]] = {"count": make_count, "extract": make_extract}

EXTRA_TASK_TABLE: dict[str, str] = {
    "count": "how often a given letter occurs among level+3 letters from a..e (paper regime)",
    "extract": "the K-th of level+3 letters, K given as a digit (paper regime)",
}


def regime_settings(regime: str) -> dict[str, Any]:
    """The spec fields (``tasks``, ``noise_fraction``) that ``regime`` sets; a clear error for an unknown name.

    Example:
        >>> regime_settings("teachable")["noise_fraction"]
        0.1
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown testbed regime {regime!r}; use one of {', '.join(REGIME_NAMES)}")
    return dict(REGIMES[regime])
