"""The columns ``srdata score`` adds to every row: the output schema of a shard and of ``annotated.parquet``.

``SCORE_COLUMNS`` are what scoring writes (in output order), ``RANK_COLUMNS`` what ranking
adds after them; ``SHARD_SCHEMA`` is the polars type of each column of a shard file.

Example:
    >>> SCORE_COLUMNS[:3], RANK_COLUMNS[-1]
    (['srd_id', 'prompt_text', 'reference_text'], 'difficulty_rank')
"""

from __future__ import annotations

import polars as pl

#: Columns srdata adds to every row (the public contract), in output order.
SCORE_COLUMNS = [
    "srd_id", "prompt_text", "reference_text", "student_output", "finish_reason", "prompt_tokens", "reference_tokens",
    "output_tokens", "prompt_truncated", "reference_truncated", "rouge_l", "ce_loss", "ce_loss_uncond", "ifd", "pmi", "invalid_reason",
]
#: Columns the ranking adds (srdata.steps.rank).
RANK_COLUMNS = ["rank_rouge_l", "rank_ce_loss", "rrf_score", "difficulty_rank"]
#: The type of every column of a shard file, in order.
SHARD_SCHEMA = {
    "srd_id": pl.Int64, "prompt_text": pl.String, "reference_text": pl.String, "student_output": pl.String, "finish_reason": pl.String,
    "prompt_tokens": pl.Int64, "reference_tokens": pl.Int64, "output_tokens": pl.Int64,
    "prompt_truncated": pl.Boolean, "reference_truncated": pl.Boolean, "rouge_l": pl.Float64,
    "ce_loss": pl.Float64, "ce_loss_uncond": pl.Float64, "ifd": pl.Float64, "pmi": pl.Float64, "invalid_reason": pl.String,
}
