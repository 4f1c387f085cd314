"""The model's limits from its own files: the context length, checked against the token
limits before any model work, and the ids that end its turn.

A causal LM has a fixed number of positions (``max_position_embeddings`` in most configs,
``n_positions`` in GPT-2's). A sequence past it fails deep inside the forward pass
(``IndexError: index out of range in self`` for learned positions) or silently degrades
(rotary positions), after hours of finished work. So the longest sequences the settings
allow are checked up front, and each setting that is too large is named with the value
that fits.

Example:
    >>> check_token_limits(1024, max_prompt_tokens=256, max_new_tokens=2000, max_reference_tokens=256)
    Traceback (most recent call last):
    ...
    ValueError: the model has 1024 positions, but --max-prompt-tokens 256 + --max-new-tokens 2000 = 2256 tokens; lower --max-new-tokens to at most 768 (or --max-prompt-tokens)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

# Config attributes that hold the number of positions, by architecture family.
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@lru_cache(maxsize=8)  # read once per run, not per shard
def model_max_positions(model: str | Path, max_model_len: int | None = None) -> int | None:
    """The most tokens one sequence may hold: the model config's positions, capped by ``max_model_len``.

    None when the config names no limit (then nothing is checked).

    Example:
        >>> model_max_positions("path/to/gpt2")  # doctest: +SKIP
        1024
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = next((int(v) for a in POSITION_ATTRIBUTES if isinstance(v := getattr(text_config, a, None), int) and v > 0), None)
    if max_model_len is not None:
        limit = max_model_len if limit is None else min(limit, max_model_len)
    return limit


def check_token_limits(
    max_positions: int | None, *, max_prompt_tokens: int, max_new_tokens: int, max_reference_tokens: int | None
) -> None:
    """Raise a ValueError naming the setting to lower when the longest allowed sequence does not fit.

    Generation needs ``prompt + new tokens`` positions; scoring needs ``prompt + reference``
    (checked per row in :func:`check_pair_lengths` when references are not capped).
    """
    if max_positions is None:
        return
    if max_prompt_tokens >= max_positions:
        raise ValueError(
            f"the model has {max_positions} positions, but --max-prompt-tokens is {max_prompt_tokens}; "
            f"lower --max-prompt-tokens below {max_positions} to leave room for the answer"
        )
    room = max_positions - max_prompt_tokens
    for flag, value in (("--max-new-tokens", max_new_tokens), ("--max-reference-tokens", max_reference_tokens)):
        if value is not None and max_prompt_tokens + value > max_positions:
            raise ValueError(
                f"the model has {max_positions} positions, but --max-prompt-tokens {max_prompt_tokens} + {flag} {value} "
                f"= {max_prompt_tokens + value} tokens; lower {flag} to at most {room} (or --max-prompt-tokens)"
            )


def check_pair_lengths(
    prompt_ids: Sequence[Sequence[int]], reference_ids: Sequence[Sequence[int]], row_ids: Sequence[Any], max_positions: int | None
) -> None:
    """Raise a ValueError naming the rows whose prompt + reference exceed the model's positions.

    Only needed when references are not capped (``--max-reference-tokens`` unset).

    Example:
        >>> check_pair_lengths([[1, 2]], [[3, 4, 5]], [7], max_positions=4)
        Traceback (most recent call last):
        ...
        ValueError: 1 row(s) do not fit the model's 4 positions (prompt + reference): row 7 (5 tokens); set --max-reference-tokens (at most 4 - --max-prompt-tokens) or lower --max-prompt-tokens
    """
    if max_positions is None:
        return
    over = [(row, len(p) + len(r)) for row, p, r in zip(row_ids, prompt_ids, reference_ids) if len(p) + len(r) > max_positions]
    if over:
        listed = ", ".join(f"row {row} ({n} tokens)" for row, n in over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
        raise ValueError(
            f"{len(over)} row(s) do not fit the model's {max_positions} positions (prompt + reference): {listed}; "
            f"set --max-reference-tokens (at most {max_positions} - --max-prompt-tokens) or lower --max-prompt-tokens"
        )


@lru_cache(maxsize=8)
def model_stop_ids(model: str | Path) -> tuple[int, ...]:
    """End-of-sequence ids the model's ``generation_config.json`` lists (empty when it has none).

    Instruct models often list several (Llama-3-Instruct: ``<|eot_id|>`` and
    ``<|end_of_text|>``); generation must stop at any of them, not only at the tokenizer's.

    Example:
        >>> model_stop_ids("path/to/student")  # doctest: +SKIP
        (2,)
    """
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model)
    except (OSError, ValueError):
        return ()
    eos = config.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    return tuple(int(i) for i in ids)
