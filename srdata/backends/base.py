"""The backend protocol: the two operations SRD needs from a student model.

A backend receives token ids (never text), so every backend sees exactly the same
inputs, built once by :func:`srdata.steps.tokenize.encode_pair`. Batching, padding and
device placement are the backend's own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

# Called by a backend as work finishes: (rows finished, tokens processed) since the last call.
ProgressCallback = Optional[Callable[[int, int], None]]


def tokens_only(progress: ProgressCallback) -> ProgressCallback:
    """``progress`` with the rows left out: for a pass whose rows another pass counts (scoring beside generation)."""
    return None if progress is None else (lambda rows, tokens: progress(0, tokens))


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings shared by all backends (greedy by default, as SRD's reference)."""

    max_new_tokens: int = 256
    no_repeat_ngram_size: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    """One generated answer: ids without the stop token, decoded text, and why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token was produced) or "length"


@dataclass(frozen=True)
class ReferenceScores:
    """A model's view of one reference: its mean NLL and, when asked, its top-K next tokens.

    ``top_ids[k]`` and ``top_logprobs[k]`` are the K most probable tokens (and their natural
    log-probabilities, highest first) at the position that predicts ``reference[k]``; both
    are ``None`` when top-K was not asked for.
    """

    nll: float
    top_ids: Optional[np.ndarray] = None  # (reference tokens, K) int32
    top_logprobs: Optional[np.ndarray] = None  # (reference tokens, K) float32


@runtime_checkable
class Backend(Protocol):
    """Generate answers and score references for a list of prompts.

    Example:
        >>> backend = HFBackend.from_pretrained("path/to/student")      # doctest: +SKIP
        >>> backend.score([[1, 2, 3]], [[4, 5, 2]])                      # doctest: +SKIP
        [5.91]
    """

    def generate(
        self, prompt_ids: Sequence[list[int]], params: GenerationParams, progress: ProgressCallback = None
    ) -> list[Generation]:
        """Greedy-decode an answer for every prompt, in input order."""
        ...

    def score(
        self, prompt_ids: Sequence[list[int]], reference_ids: Sequence[list[int]], progress: ProgressCallback = None
    ) -> list[float]:
        """Mean negative log-likelihood (nats) of each reference given its prompt, teacher-forced."""
        ...

    def score_top_k(
        self, prompt_ids: Sequence[list[int]], reference_ids: Sequence[list[int]], top_k: int, progress: ProgressCallback = None
    ) -> list[ReferenceScores]:
        """:meth:`score` plus the top-``top_k`` log-probabilities at every reference position (a teacher pass)."""
        ...

    def score_and_generate(
        self,
        prompt_ids: Sequence[list[int]],
        reference_ids: Sequence[list[int]],
        params: GenerationParams,
        progress: ProgressCallback = None,
    ) -> tuple[list[float], list[Generation]]:
        """Both of the above for the same prompts, in input order; what a scoring run calls.

        A backend does both in one sweep so each prompt's computation can be reused (a
        shared prompt cache, or a prefix cache that is still warm).
        """
        ...
