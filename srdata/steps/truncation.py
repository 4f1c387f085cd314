"""Say when prompts or references are cut: before the run (from the tokenizer) and after it.

A prompt longer than ``--max-prompt-tokens`` loses its start (or end) and a reference longer
than ``--max-reference-tokens`` its end; both change the scores. The manifest counts them,
but a count nobody reads is a silent cut, so ``srdata score`` says it, with the setting
that would keep every text whole:

    warning: of 2000 sampled rows, 980 prompts (49%) are longer than --max-prompt-tokens 256
    and are cut; --max-prompt-tokens 612 keeps them all

Example:
    >>> for line in truncation_before(dataset, tokenizer, config, pending): print(line)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import polars as pl

from srdata.config import ScoreConfig
from srdata.run.folder import Shard
from srdata.steps.dataset import column_mapping
from srdata.steps.prompts import render_rows
from srdata.steps.tokenize import describe_cuts, full_lengths, prompt_lengths

#: Rows tokenized before the run to foresee the cuts (tokenizing is fast, but not free on millions).
SAMPLE_ROWS = 2000


def truncation_before(dataset: Any, tokenizer: Any, config: ScoreConfig, pending: list[Shard]) -> list[str]:
    """Warnings for the prompts and references the run will cut, from the first ``SAMPLE_ROWS`` pending rows.

    ``config`` is the run's resolved config (its template and columns).
    """
    rows_to_score = sum(s.stop - s.start for s in pending)
    indices: list[int] = []
    for shard in pending:
        indices += range(shard.start, min(shard.stop, shard.start + SAMPLE_ROWS - len(indices)))
        if len(indices) >= SAMPLE_ROWS:
            break
    if not indices:
        return []
    template = config.prompt.template
    rendered = [r for r in render_rows(dataset.select(indices)[:], column_mapping(config), template, tokenizer) if r.invalid_reason is None]
    sampled = len(indices) < rows_to_score
    prompts = prompt_lengths(tokenizer, [r.prompt_text for r in rendered], template)
    references = full_lengths(tokenizer, [r.reference for r in rendered], add_special_tokens=False, eos=True)
    p = config.prompt
    lines = [
        describe_cuts("prompts", prompts, p.max_prompt_tokens, "--max-prompt-tokens", sampled=sampled),
        describe_cuts("references", references, p.max_reference_tokens, "--max-reference-tokens", sampled=sampled),
    ]
    return [line for line in lines if line]


def truncation_after(scored: pl.DataFrame, tokenizer: Any, config: ScoreConfig) -> list[str]:
    """Warnings for the prompts and references this run cut (every scored row), with the setting that keeps them."""
    valid = scored.filter(pl.col("invalid_reason").is_null() & pl.col("ce_loss").is_not_null())
    lines = []
    for column, flag, what, setting, limit in (
        ("prompt_text", "prompt_truncated", "prompts", "--max-prompt-tokens", config.prompt.max_prompt_tokens),
        ("reference_text", "reference_truncated", "references", "--max-reference-tokens", config.prompt.max_reference_tokens),
    ):
        texts = valid.filter(pl.col(flag).fill_null(False))[column].to_list()
        if what == "prompts":
            lengths = prompt_lengths(tokenizer, texts, config.prompt.template)
        else:
            lengths = full_lengths(tokenizer, texts, add_special_tokens=False, eos=True)
        line = describe_cuts(what, lengths, limit, setting, total=valid.height)
        if line:
            lines.append(line.replace(" are cut;", " were cut;"))
    return lines
