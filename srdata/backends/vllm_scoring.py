"""The scoring requests of the vLLM backend and the reduction of their answers.

A reference is scored by one request whose prompt is ``prompt + reference`` and whose
answer holds, per reference token, log p(token | everything before it). Two request forms:

* **All positions** (every vLLM this backend supports): ``prompt_logprobs=0`` (or ``K``
  for the top K), one entry per prompt token in ``RequestOutput.prompt_logprobs``; every
  position of the prompt is computed over the whole vocabulary and sent back, although
  only the reference's are read.
* **Reference rows** (vLLM >= 0.32 on Model Runner V2; see
  :func:`srdata.backends.vllm_runner.scoring_path`): ``prompt_logprob_start =
  len(prompt) - 1`` and ``prompt_logprob_token_ids = [[t] for t in reference]``; the
  engine computes the logits of the reference rows alone and answers one float per
  reference token in ``RequestOutput.prompt_token_id_logprobs`` (shape ``[R, 1]``).
  From vLLM 0.34 ``prompt_logprob_start`` also limits ``prompt_logprobs=K`` (the top-K
  pass), whose answer keeps one entry per prompt token, None before the start.

Plain functions over objects shaped like vLLM's, tested on a CPU without vLLM.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# Log-probabilities are <= 0; an answer above this is not one (e.g. an engine started with
# logprobs_mode="raw_logits" returns logits) and is refused rather than averaged.
MAX_LOGPROB = 1e-4


def token_list(ids: Sequence[int]) -> list[int]:
    """Plain ints (numpy or torch scalars are not what vLLM's request types expect).

    Example:
        >>> token_list(np.array([5, 6]))
        [5, 6]
    """
    return [int(t) for t in ids]


# ------------------------------------------------------------------- request building
def scoring_prompt(prompt_ids: Sequence[int], reference_ids: Sequence[int]) -> dict[str, list[int]]:
    """The scoring request's prompt: ``prompt + reference`` as a vLLM ``TokensPrompt``.

    ``TokensPrompt`` is a TypedDict, so at run time it is this plain dict.

    Example:
        >>> scoring_prompt([5, 6], [7, 2])
        {'prompt_token_ids': [5, 6, 7, 2]}
    """
    if not prompt_ids:
        raise ValueError("a prompt has no tokens; the first reference token needs a context to be scored")
    if not reference_ids:
        raise ValueError("a reference has no tokens; it must at least hold the end-of-sequence id")
    return {"prompt_token_ids": token_list(prompt_ids) + token_list(reference_ids)}


def scoring_sampling_kwargs() -> dict[str, Any]:
    """``SamplingParams`` of a scoring request.

    ``prompt_logprobs=0`` returns the log-probability of the actual prompt token only
    (no top-k alternatives); ``flat_logprobs`` stores them in a few flat lists instead of
    one dict per position; ``skip_reading_prefix_cache`` is what vLLM derives for prompt
    logprobs anyway (cached positions have no logits), stated here so it cannot change.

    Example:
        >>> scoring_sampling_kwargs()["prompt_logprobs"]
        0
    """
    return {
        "temperature": 0.0,
        "max_tokens": 1,
        "prompt_logprobs": 0,
        "detokenize": False,
        "flat_logprobs": True,
        "skip_reading_prefix_cache": True,
    }


def reference_rows_kwargs(prompt_len: int, reference_ids: Sequence[int]) -> dict[str, Any]:
    """``SamplingParams`` of a scoring request that scores the reference rows alone.

    Row ``i`` of ``prompt_logprob_token_ids`` scores its ids as predictions of prompt token
    ``prompt_logprob_start + i + 1``; with the start at the last prompt token, row ``k``
    holds log p(reference[k] | prompt + reference[:k]), and there are exactly
    ``len(reference)`` rows, as vLLM requires (``prompt_len - 1 - start``). No
    ``prompt_logprobs``: no other position is computed or returned.

    Example:
        >>> kwargs = reference_rows_kwargs(2, [7, 2])
        >>> kwargs["prompt_logprob_start"], kwargs["prompt_logprob_token_ids"].tolist(), kwargs["prompt_logprobs"]
        (1, [[7], [2]], None)
    """
    if prompt_len < 1 or not reference_ids:
        raise ValueError("a scoring request needs at least one prompt token and one reference token")
    return {
        **scoring_sampling_kwargs(),
        "prompt_logprobs": None,
        "prompt_logprob_start": prompt_len - 1,
        "prompt_logprob_token_ids": np.asarray(token_list(reference_ids), dtype=np.int32).reshape(-1, 1),
    }


def top_k_kwargs(prompt_len: int, top_k: int, from_reference: bool) -> dict[str, Any]:
    """``SamplingParams`` of a ``prompt_logprobs=top_k`` request; ``from_reference`` (vLLM >= 0.34) skips the prompt rows.

    Example:
        >>> top_k_kwargs(5, 8, True)["prompt_logprob_start"], "prompt_logprob_start" in top_k_kwargs(5, 8, False)
        (4, False)
    """
    kwargs = {**scoring_sampling_kwargs(), "prompt_logprobs": top_k}
    if from_reference:
        kwargs["prompt_logprob_start"] = prompt_len - 1
    return kwargs


# ------------------------------------------------------------------- output reduction
def position_logprob(prompt_logprobs: Any, position: int, token_id: int) -> float:
    """Log-probability of ``token_id`` at ``position`` of a ``RequestOutput.prompt_logprobs``.

    Accepts both layouts vLLM returns: a list whose entries are ``{token_id: Logprob}``
    dicts (entry 0 is None), or a ``FlatLogprobs`` (``flat_logprobs=True``), read through
    its flat lists without building per-position dicts.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> position_logprob([None, {7: NS(logprob=-0.5)}], 1, 7)
        -0.5
    """
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs
        start, end = prompt_logprobs.start_indices[position], prompt_logprobs.end_indices[position]
        for i in range(start, end):
            if prompt_logprobs.token_ids[i] == token_id:
                return float(prompt_logprobs.logprobs[i])
        raise ValueError(f"vLLM returned no log-probability for token {token_id} at prompt position {position}")
    entry = prompt_logprobs[position]
    if entry is None or token_id not in entry:
        raise ValueError(f"vLLM returned no log-probability for token {token_id} at prompt position {position}")
    return float(entry[token_id].logprob)


def mean_reference_nll(prompt_logprobs: Any, prompt_len: int, reference_ids: Sequence[int]) -> float:
    """Mean NLL (nats) over the reference positions of one scoring request.

    Position ``prompt_len + k`` holds log p(reference[k] | everything before it).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> lps = [None, {6: NS(logprob=-9.0)}, {7: NS(logprob=-1.0)}, {2: NS(logprob=-3.0)}]
        >>> mean_reference_nll(lps, prompt_len=2, reference_ids=[7, 2])
        2.0
    """
    if prompt_logprobs is None:
        raise ValueError("the vLLM output has no prompt logprobs; the request must set prompt_logprobs=0")
    expected = prompt_len + len(reference_ids)
    if len(prompt_logprobs) != expected:
        # A request that read the prefix cache returns fewer positions (no logits there).
        raise ValueError(
            f"vLLM returned {len(prompt_logprobs)} prompt positions, expected {expected}; "
            "prompt-logprob requests must not read the prefix cache (skip_reading_prefix_cache)"
        )
    if not reference_ids:
        raise ValueError("a reference has no tokens")
    total = math.fsum(
        -position_logprob(prompt_logprobs, prompt_len + k, int(token)) for k, token in enumerate(reference_ids)
    )
    return total / len(reference_ids)


def reference_top_k(prompt_logprobs: Any, prompt_len: int, reference_ids: Sequence[int], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-``top_k`` ids and log-probs at each reference position of a ``prompt_logprobs=top_k`` request.

    vLLM's flat layout holds, per position, the actual token first and then the top K by
    rank (1..K); the ranks are checked, so a layout change is an error, not shifted data.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> flat = NS(start_indices=[0, 0, 3], end_indices=[0, 3, 6], token_ids=[7, 7, 4, 2, 9, 2],
        ...           logprobs=[-.1, -.1, -2., -3., -.5, -3.], ranks=[1, 1, 2, 3, 1, 2])
        >>> ids, lps = reference_top_k(flat, 1, [7, 2], 2)
        >>> ids.tolist(), lps.tolist()
        ([[7, 4], [9, 2]], [[-0.10000000149011612, -2.0], [-0.5, -3.0]])
    """
    if not hasattr(prompt_logprobs, "start_indices"):
        raise ValueError("top-K prompt log-probs need vLLM's flat layout (flat_logprobs=True)")
    ids = np.empty((len(reference_ids), top_k), dtype=np.int32)
    logprobs = np.empty((len(reference_ids), top_k), dtype=np.float32)
    for k in range(len(reference_ids)):
        start, end = prompt_logprobs.start_indices[prompt_len + k] + 1, prompt_logprobs.end_indices[prompt_len + k]
        if end - start != top_k or list(prompt_logprobs.ranks[start:end]) != list(range(1, top_k + 1)):
            raise ValueError(f"vLLM returned an unexpected top-{top_k} layout at prompt position {prompt_len + k}")
        ids[k] = prompt_logprobs.token_ids[start:end]
        logprobs[k] = prompt_logprobs.logprobs[start:end]
    return ids, logprobs


def reference_rows_nll(token_id_logprobs: Any, reference_ids: Sequence[int]) -> float:
    """Mean NLL (nats) from the ``prompt_token_id_logprobs`` of a :func:`reference_rows_kwargs` request.

    The answer must be ``[len(reference), 1]`` finite log-probabilities: anything else (no
    answer, another shape, a logit) raises instead of being averaged.

    Example:
        >>> reference_rows_nll(np.array([[-1.0], [-3.0]], dtype=np.float32), [7, 2])
        2.0
    """
    if token_id_logprobs is None:
        raise ValueError("the vLLM output has no prompt_token_id_logprobs")
    scores = np.asarray(token_id_logprobs)
    if scores.shape != (len(reference_ids), 1):
        raise ValueError(
            f"vLLM returned prompt_token_id_logprobs of shape {scores.shape}, expected ({len(reference_ids)}, 1)"
        )
    column = scores[:, 0].astype(np.float64)
    if not np.isfinite(column).all() or column.max() > MAX_LOGPROB:
        raise ValueError(
            "vLLM returned values that are not log-probabilities for the reference tokens "
            f"(min {column.min()}, max {column.max()}); do not set logprobs_mode to a logits mode"
        )
    return -math.fsum(column.tolist()) / len(reference_ids)
