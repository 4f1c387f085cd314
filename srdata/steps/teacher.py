"""The teacher pass's own steps: may this teacher score the run's ids, and how its answers are stored.

* :func:`tokenizer_differences` decides whether the teacher reads the student's token ids
  the same way. The teacher never re-tokenizes: it scores the run's exact ids, so the two
  vocabularies (every token string -> id) and special tokens must be equal. A model whose
  embedding matrix is padded past the tokenizer's vocabulary (Qwen, Llama variants pad to a
  multiple of 64 or 128) is accepted: :func:`padded_vocabulary_note` says so.
* :func:`token_ids_digest` fingerprints one row's ``prompt + reference`` ids, so a consumer of
  the stored top-K (``srd-distill --teacher-logits``) proves that its own encoding of the row
  is the one the teacher saw.
* :func:`teacher_frame` lays a shard's results out as columns: ``teacher_ce_loss`` and, with
  top-K, one flat ``int32`` list of ids and one flat ``float16`` list of log-probs per row
  (``reference_tokens x K`` each, highest first at every position).

Example:
    >>> token_ids_digest([1, 2, 3], [4, 2]) == token_ids_digest([1, 2, 3], [4, 2])
    True
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import polars as pl

#: The teacher pass's folder inside a run (its manifest and top-K shards).
TEACHER_FOLDER = "teacher"
#: The teacher columns a run's ``annotated.parquet`` gains (the public contract).
TEACHER_COLUMNS = ["teacher_ce_loss", "excess_ce_loss"]

TEACHER_SHARD_SCHEMA = {
    "srd_id": pl.Int64,
    "teacher_ce_loss": pl.Float64,
    "prompt_tokens": pl.Int64,
    "reference_tokens": pl.Int64,
    "token_ids_sha256": pl.String,
}
TOP_K_SCHEMA = {"top_ids": pl.List(pl.Int32), "top_logprobs": pl.List(pl.Float16)}


def token_ids_digest(prompt_ids: Sequence[int], reference_ids: Sequence[int]) -> str:
    """SHA-256 (hex) of a row's prompt and reference ids, with the split between them.

    Example:
        >>> token_ids_digest([1, 2], [3]) != token_ids_digest([1], [2, 3])
        True
    """
    digest = hashlib.sha256(np.asarray([len(prompt_ids)], dtype="<i8").tobytes())
    digest.update(np.asarray(list(prompt_ids) + list(reference_ids), dtype="<i4").tobytes())
    return digest.hexdigest()


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {name: getattr(tokenizer, name, None) for name in names}


def tokenizer_differences(student: Any, teacher: Any, limit: int = 5) -> list[str]:
    """What makes the teacher read the student's ids differently; empty when it reads them the same.

    Example:
        >>> tokenizer_differences(tokenizer, tokenizer)       # doctest: +SKIP
        []
    """
    problems: list[str] = []
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if len(student_vocab) != len(teacher_vocab):
        problems.append(f"the student's tokenizer has {len(student_vocab)} tokens, the teacher's {len(teacher_vocab)}")
    moved = [(token, i, teacher_vocab.get(token)) for token, i in sorted(student_vocab.items(), key=lambda kv: kv[1]) if teacher_vocab.get(token) != i]
    if moved:
        shown = "; ".join(f"{token!r} is {i} for the student, {j if j is not None else 'absent'} for the teacher" for token, i, j in moved[:limit])
        more = f" (and {len(moved) - limit} more)" if len(moved) > limit else ""
        problems.append(f"{len(moved)} token(s) have other ids: {shown}{more}")
    s_special, t_special = _special_tokens(student), _special_tokens(teacher)
    for name in s_special:
        if s_special[name] != t_special[name]:
            problems.append(f"{name}: {s_special[name]!r} for the student, {t_special[name]!r} for the teacher")
    return problems


def padded_vocabulary_note(tokenizer_tokens: int, teacher_rows: int, student_rows: int) -> str | None:
    """A sentence when the teacher's output layer is padded past the shared tokenizer; None when not.

    Raises ValueError when the teacher's output layer cannot score every token of the tokenizer.

    Example:
        >>> padded_vocabulary_note(49152, 49152, 49152) is None
        True
        >>> padded_vocabulary_note(151665, 151936, 151665)
        "the teacher's output layer has 151936 rows for the tokenizer's 151665 tokens (padded); the 271 padding ids are scored like any other, and where they enter the top-K they count as the student's tail"
    """
    if teacher_rows < tokenizer_tokens:
        raise ValueError(
            f"the teacher's output layer has {teacher_rows} rows but the shared tokenizer has {tokenizer_tokens} tokens; "
            "it cannot score every token id of the run"
        )
    if teacher_rows == student_rows == tokenizer_tokens or teacher_rows == student_rows:
        return None
    return (
        f"the teacher's output layer has {teacher_rows} rows for the tokenizer's {tokenizer_tokens} tokens (padded); "
        f"the {teacher_rows - tokenizer_tokens} padding ids are scored like any other, and where they enter the top-K "
        "they count as the student's tail"
    )


def teacher_frame(
    srd_ids: Sequence[int], prompt_ids: Sequence[Sequence[int]], reference_ids: Sequence[Sequence[int]], scores: Sequence[Any],
    top_k: int, invalid_ids: Sequence[int] = (),
) -> pl.DataFrame:
    """One shard's teacher results as columns, a row per ``srd_id`` (invalid rows: nulls).

    ``scores`` are the backend's :class:`~srdata.backends.base.ReferenceScores`, in the order of
    ``srd_ids``. Rows listed in ``invalid_ids`` (not scored by the student either) get nulls.
    """
    columns: dict[str, list] = {
        "srd_id": [*srd_ids, *invalid_ids],
        "teacher_ce_loss": [s.nll for s in scores] + [None] * len(invalid_ids),
        "prompt_tokens": [len(p) for p in prompt_ids] + [None] * len(invalid_ids),
        "reference_tokens": [len(r) for r in reference_ids] + [None] * len(invalid_ids),
        "token_ids_sha256": [token_ids_digest(p, r) for p, r in zip(prompt_ids, reference_ids)] + [None] * len(invalid_ids),
    }
    frame = pl.DataFrame(columns, schema=TEACHER_SHARD_SCHEMA)
    if top_k:
        n_invalid = len(invalid_ids)
        frame = frame.with_columns(
            _flat_lists("top_ids", [s.top_ids for s in scores], np.int32, n_invalid),
            _flat_lists("top_logprobs", [s.top_logprobs for s in scores], np.float16, n_invalid),
        )
    return frame.sort("srd_id")


def _flat_lists(name: str, arrays: Sequence[np.ndarray], dtype: Any, n_null: int) -> pl.Series:
    """One list per array (flattened, cast to ``dtype``), then ``n_null`` null lists; built in one Arrow array."""
    import pyarrow as pa

    sizes = [a.size for a in arrays] + [0] * n_null
    offsets = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    values = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
    mask = pa.array([False] * len(arrays) + [True] * n_null)
    return pl.Series(name, pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask))


def row_top_k(top_ids: Sequence[int], top_logprobs: Sequence[float], reference_tokens: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """One stored row's flat lists back as ``(reference_tokens, K)`` arrays (ids int64, log-probs float32).

    Example:
        >>> ids, lps = row_top_k([5, 6, 7, 8], [-0.5, -1.0, -0.25, -2.0], reference_tokens=2, top_k=2)
        >>> ids.tolist(), lps.tolist()
        ([[5, 6], [7, 8]], [[-0.5, -1.0], [-0.25, -2.0]])
    """
    ids = np.asarray(top_ids, dtype=np.int64)
    logprobs = np.asarray(top_logprobs, dtype=np.float32)
    if ids.size != reference_tokens * top_k or logprobs.size != ids.size:
        raise ValueError(f"a stored row holds {ids.size} ids and {logprobs.size} log-probs, expected {reference_tokens} x {top_k}")
    return ids.reshape(reference_tokens, top_k), logprobs.reshape(reference_tokens, top_k)
