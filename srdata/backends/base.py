"""The backend protocol: what every caller needs from a model (build, context length, generate, score, close).

A backend receives token ids (never text), so every backend sees exactly the same
inputs, built once by :func:`srdata.steps.tokenize.encode_pairs`. Batching, padding and
device placement are the backend's own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from srdata.config import ScoreConfig

# Called by a backend as work finishes: (rows finished, tokens processed) since the last call.
ProgressCallback = Optional[Callable[[int, int], None]]
Rows = Sequence[list[int]]  # token ids, one list per row


def check_pairs(prompt_ids: Rows, reference_ids: Rows) -> None:
    """Refuse prompts and references of different counts: scores would be paired with the wrong rows.

    Example:
        >>> check_pairs([[1]], [[2], [3]])
        Traceback (most recent call last):
        ValueError: got 1 prompts but 2 references
    """
    if len(prompt_ids) != len(reference_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(reference_ids)} references")


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
    """Generate answers and score references for a list of prompts: what every caller uses.

    A backend is registered by name in :mod:`srdata.backends.registry` and built with
    :meth:`from_config`. Backends subclass this protocol to inherit its shared parts
    (:meth:`score` from :meth:`score_top_k`, :meth:`context_length` from the model's config,
    a :meth:`close` that has nothing to release).

    Example:
        >>> backend = HFBackend.from_pretrained("path/to/student")      # doctest: +SKIP
        >>> backend.score([[1, 2, 3]], [[4, 5, 2]])                      # doctest: +SKIP
        [5.91]
    """

    #: Packages whose versions decide the values this backend computes: recorded in the
    #: manifest and compared between Ray replicas (:func:`srdata.backends.backend_packages`).
    packages: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config: ScoreConfig, tokenizer: Any = None) -> Backend:
        """The backend for a scoring run: it reads the settings it uses from ``config`` itself."""
        ...

    @classmethod
    def context_length(cls, config: ScoreConfig) -> int | None:
        """The most tokens one sequence may hold, as this backend sees the run's model (None: unknown).

        Known before the model loads, so a run checks its token limits first. Default: the
        positions of the model's config (:func:`srdata.steps.context.model_max_positions`).

        Example:
            >>> HFBackend.context_length(config)       # doctest: +SKIP
            2048
        """
        from srdata.steps.context import model_max_positions  # reads the model's config.json

        return model_max_positions(config.model.path)

    def generate(self, prompt_ids: Rows, params: GenerationParams, progress: ProgressCallback = None) -> list[Generation]:
        """Greedy-decode an answer for every prompt, in input order."""
        ...

    def score(self, prompt_ids: Rows, reference_ids: Rows, progress: ProgressCallback = None) -> list[float]:
        """Mean NLL (nats) of each reference given its prompt, end-of-sequence included, teacher-forced."""
        return [scores.nll for scores in self.score_top_k(prompt_ids, reference_ids, 0, tokens_only(progress))]

    def score_top_k(
        self, prompt_ids: Rows, reference_ids: Rows, top_k: int, progress: ProgressCallback = None
    ) -> list[ReferenceScores]:
        """:meth:`score` plus the top-``top_k`` log-probabilities at every reference position (a teacher pass)."""
        ...

    def score_and_generate(
        self, prompt_ids: Rows, reference_ids: Rows, params: GenerationParams, progress: ProgressCallback = None
    ) -> tuple[list[float], list[Generation]]:
        """Both of the above for the same prompts, in input order; what a scoring run calls.

        A backend does both in one sweep so each prompt's computation can be reused (a
        shared prompt cache, or a prefix cache that is still warm).
        """
        ...

    def close(self) -> None:
        """Release what the backend holds (an engine, its memory, child processes); a second call does nothing."""
