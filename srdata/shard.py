"""Score one shard: render prompts -> tokenize -> generate + score -> metrics.

What every engine runs on its rows (in this process or on a Ray actor), with the
tokenizer and the student backend this module also knows how to load. It does not
know who calls it: :func:`srdata.pipeline.score` plans the shards and writes them.

Example:
    >>> frame = score_shard(rows, shard, mapping, "chat", tokenizer, backend, config)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import polars as pl

from srdata.backends import GenerationParams, backend_class, load_backend
from srdata.config import ScoreConfig
from srdata.steps.context import check_pair_lengths, model_stop_ids
from srdata.steps.load import ColumnMapping
from srdata.steps.prompts import chat_affixes, render_rows, unconditional_prompt
from srdata.steps.rouge import rouge_l
from srdata.run.folder import Shard
from srdata.steps.tokenize import encode_pairs, resolve_eos_id, unconditional_prompt_ids

log = logging.getLogger(__name__)

#: Columns srdata adds to every row (the public contract), in output order.
SCORE_COLUMNS = [
    "srd_id", "prompt_text", "reference_text", "student_output", "finish_reason", "prompt_tokens", "reference_tokens",
    "output_tokens", "prompt_truncated", "reference_truncated", "rouge_l", "ce_loss", "ce_loss_uncond", "ifd", "pmi", "invalid_reason",
]
RANK_COLUMNS = ["rank_rouge_l", "rank_ce_loss", "rrf_score", "difficulty_rank"]
SHARD_SCHEMA = {
    "srd_id": pl.Int64, "prompt_text": pl.String, "reference_text": pl.String, "student_output": pl.String, "finish_reason": pl.String,
    "prompt_tokens": pl.Int64, "reference_tokens": pl.Int64, "output_tokens": pl.Int64,
    "prompt_truncated": pl.Boolean, "reference_truncated": pl.Boolean, "rouge_l": pl.Float64,
    "ce_loss": pl.Float64, "ce_loss_uncond": pl.Float64, "ifd": pl.Float64, "pmi": pl.Float64, "invalid_reason": pl.String,
}


class ShardInterrupted(KeyboardInterrupt):
    """Ctrl-C while a shard was scored: ``frame`` holds its rows that were finished (a subset, by srd_id)."""

    def __init__(self, shard: Shard, frame: pl.DataFrame) -> None:
        super().__init__(f"interrupted in shard {shard.index} with {frame.height} of its rows finished")
        self.shard, self.frame = shard, frame


def score_shard(
    rows: dict[str, list], shard: Shard, mapping: ColumnMapping, template: str, tokenizer: Any, backend: Any,
    config: ScoreConfig, on_progress: Callable[[int, int], None] | None = None, srd_ids: list[int] | None = None,
) -> pl.DataFrame:
    """Score one shard's rows: render, tokenize, score references, generate, ROUGE-L (and the asked signals).

    ``srd_ids`` names the rows when they are not all of the shard's (a resumed partial shard).
    A Ctrl-C raises :class:`ShardInterrupted` holding every row that was finished.
    """
    ids = list(range(shard.start, shard.stop)) if srd_ids is None else srd_ids
    rendered, valid, pairs = encode_shard(rows, shard, mapping, template, tokenizer, config, ids)
    encoding = encoding_options(config, template, tokenizer)
    prompt_ids = [p.prompt_ids for p in pairs]
    references = [p.reference_ids for p in pairs]
    eos_id = resolve_eos_id(tokenizer)  # the one appended to references; the model's own end ids also stop generation
    stop_ids = (eos_id, *(i for i in model_stop_ids(config.model.model) if i != eos_id))
    params = GenerationParams(config.generation.max_new_tokens, config.generation.no_repeat_ngram_size, stop_ids)
    uncond: dict[int, float] | None = None
    if "ifd" in config.metrics.signals and valid:
        # The same reference ids after the template's empty prompt: one more forward over a short
        # shared prompt and the reference tokens (no generation). Before generation, so that a
        # Ctrl-C during the long generation still keeps the rows it finished.
        uncond_ids = unconditional_prompt_ids(tokenizer, unconditional_prompt(template, mapping, tokenizer), **encoding)
        try:
            uncond = dict(enumerate(backend.score([uncond_ids] * len(pairs), references, on_progress)))
        except KeyboardInterrupt:
            raise ShardInterrupted(shard, _frame(ids, rendered, valid, pairs, {}, {}, None, config)) from None
    try:
        ce_losses, generations = backend.score_and_generate(prompt_ids, references, params, on_progress)
    except KeyboardInterrupt as stop:  # keep what the backend finished (BackendInterrupted), the invalid rows too
        losses, done = getattr(stop, "losses", {}), getattr(stop, "generations", {})
        raise ShardInterrupted(shard, _frame(ids, rendered, valid, pairs, losses, done, uncond, config)) from None
    return _frame(ids, rendered, valid, pairs, dict(enumerate(ce_losses)), dict(enumerate(generations)), uncond, config)


def _frame(
    ids: list[int], rendered: list[Any], valid: list[int], pairs: list[Any], ce_losses: dict[int, float],
    generations: dict[int, Any], uncond: dict[int, float] | None, config: ScoreConfig,
) -> pl.DataFrame:
    """The shard's table: every invalid row, and the valid rows whose work is all in (by position in ``valid``)."""
    finished = [k for k in range(len(valid)) if k in ce_losses and k in generations and (uncond is None or k in uncond)]
    rouge = dict(zip(finished, rouge_l([generations[k].text for k in finished], [rendered[valid[k]].reference for k in finished],
                                       tokenizer=config.metrics.rouge_tokenizer)))
    positions = set(range(len(rendered))) - set(valid) | {valid[k] for k in finished}
    columns: dict[str, list] = {name: [None] * len(rendered) for name in SHARD_SCHEMA}
    columns["srd_id"] = list(ids)
    for i, r in enumerate(rendered):
        columns["invalid_reason"][i] = r.invalid_reason
        columns["prompt_text"][i] = r.prompt_text
        columns["reference_text"][i] = r.reference
    for k in finished:
        i, pair, generation = valid[k], pairs[k], generations[k]
        columns["student_output"][i] = generation.text
        columns["finish_reason"][i] = generation.finish_reason
        columns["prompt_tokens"][i] = len(pair.prompt_ids)
        columns["reference_tokens"][i] = len(pair.reference_ids)
        columns["output_tokens"][i] = len(generation.token_ids)
        columns["prompt_truncated"][i] = pair.prompt_truncated
        columns["reference_truncated"][i] = pair.reference_truncated
        columns["rouge_l"][i] = rouge[k]
        columns["ce_loss"][i] = ce_losses[k]
        if uncond is not None:
            columns["ce_loss_uncond"][i] = uncond[k]
            columns["ifd"][i] = instruction_following_difficulty(ce_losses[k], uncond[k])
            columns["pmi"][i] = prompt_pmi(ce_losses[k], uncond[k], len(pair.reference_ids))
    frame = pl.DataFrame(columns, schema=SHARD_SCHEMA)
    if len(positions) == len(rendered):
        return frame
    return frame.with_row_index("_at").filter(pl.col("_at").is_in(sorted(positions))).drop("_at")


def encode_shard(
    rows: dict[str, list], shard: Shard, mapping: ColumnMapping, template: str, tokenizer: Any, config: ScoreConfig,
    srd_ids: list[int] | None = None,
) -> tuple[list[Any], list[int], list[Any]]:
    """Render and tokenize a shard's rows: ``(rendered rows, positions of the valid ones, their encoded pairs)``.

    The one encoding of a run: the scoring pass and the teacher pass both call it, so the
    teacher sees exactly the ids the student was scored on.
    """
    rendered = render_rows(rows, mapping, template, tokenizer)
    valid = [i for i, r in enumerate(rendered) if r.invalid_reason is None]
    pairs = encode_pairs(
        tokenizer,
        [rendered[i].prompt_text for i in valid],
        [rendered[i].reference for i in valid],
        max_reference_tokens=config.prompt.max_reference_tokens,
        **encoding_options(config, template, tokenizer),
    )
    if config.prompt.max_reference_tokens is None:  # uncapped references: check each row's length
        ids = list(range(shard.start, shard.stop)) if srd_ids is None else srd_ids
        check_pair_lengths([p.prompt_ids for p in pairs], [p.reference_ids for p in pairs], [ids[i] for i in valid], max_positions(config))
    return rendered, valid, pairs


def instruction_following_difficulty(ce_loss: float, ce_loss_uncond: float) -> float:
    """IFD = ce_loss / ce_loss_uncond: above 1 when the prompt makes the reference *less* likely.

    A zero unconditional loss (the reference is certain without any prompt) gives 1 when
    the conditional loss is zero too (the prompt changes nothing) and infinity otherwise
    (the prompt only hurts), so that every scored row keeps a rankable value.

    Example:
        >>> instruction_following_difficulty(1.5, 3.0)
        0.5
    """
    if ce_loss_uncond == 0:
        return 1.0 if ce_loss == 0 else float("inf")
    return ce_loss / ce_loss_uncond


def prompt_pmi(ce_loss: float, ce_loss_uncond: float, reference_tokens: int) -> float:
    """Nats the prompt saves on the whole reference: log p(reference | prompt) - log p(reference | empty prompt).

    The pointwise mutual information of prompt and reference under the student, summed
    over the reference tokens (end-of-sequence included): high when the reference answers
    *this* prompt, near zero or negative when it could follow any prompt (a swapped or
    misaligned answer). Unlike ``ifd``, a ratio of per-token means, it is not divided by
    the length, so a short label that any question makes likelier keeps a small value.

    Example:
        >>> prompt_pmi(1.5, 3.0, reference_tokens=4)
        6.0
    """
    return (ce_loss_uncond - ce_loss) * reference_tokens


def encoding_options(config: ScoreConfig, template: str, tokenizer: Any) -> dict[str, Any]:
    """How every prompt of the run is encoded (the rows' and the unconditional one)."""
    return dict(
        max_prompt_tokens=config.prompt.max_prompt_tokens,
        truncation_side=config.prompt.truncation_side,
        add_special_tokens=template != "chat",  # chat templates write their own special tokens
        keep=chat_affixes(tokenizer) if template == "chat" else ("", ""),  # truncation never cuts the turn markers
    )


def check_model_path(model: str) -> None:
    """Refuse a ``--model`` that is a file, or a path (``./x``, ``/x``, ``a/b/c``) that does not exist: a typo, named at once.

    Example:
        >>> check_model_path("/no/such/model")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model folder /no/such/model does not exist; pass a folder saved with save_pretrained or a hub id
    """
    if Path(model).is_file():
        raise FileNotFoundError(
            f"--model {model} is a file; pass the folder that save_pretrained wrote (the one holding config.json "
            "and the tokenizer files), or a hub id"
        )
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise FileNotFoundError(f"model folder {model} does not exist; pass a folder saved with save_pretrained or a hub id")


def load_tokenizer(config: ScoreConfig) -> Any:
    from transformers import AutoTokenizer

    model = config.model.model
    check_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load the tokenizer of model {model!r}: it is not a local folder and the Hugging Face hub "
            f"could not provide it (offline?). Pass a folder saved with save_pretrained. ({err})"
        ) from err
    if config.prompt.eos_token is not None:
        if config.prompt.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"--eos-token {config.prompt.eos_token!r} is not a token of the tokenizer's vocabulary")
        tokenizer.eos_token = config.prompt.eos_token
    resolve_eos_id(tokenizer)  # fail early, before any model work, when there is none
    return tokenizer


def max_positions(config: ScoreConfig) -> int | None:
    """The model's positions as the run's backend sees them (vLLM's ``--max-model-len`` lowers them; transformers ignores it)."""
    return backend_class(config.model.backend).context_length(config)


class LoadedStudent:
    """The student loaded once (tokenizer + backend), scoring whole shards: what every engine calls.

    Engines receive this class (``ShardJob.open_student``) and call it where they run: in
    this process, or once per Ray actor; they never import the scoring code themselves.

    Example:
        >>> student = LoadedStudent(config, mapping, "alpaca")      # doctest: +SKIP
        >>> frame = student(rows, Shard(0, 0, 100))                 # doctest: +SKIP
        >>> student.close()                                         # doctest: +SKIP
    """

    def __init__(
        self, config: ScoreConfig, mapping: ColumnMapping, template: str, tokenizer: Any = None, kept: dict[int, pl.DataFrame] | None = None
    ) -> None:
        self.config, self.mapping, self.template = config, mapping, template
        self.kept = kept or {}  # shard index -> its rows finished by an interrupted run (verified by the caller)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        self.backend = load_backend(config, tokenizer=self.tokenizer)

    def __call__(self, rows: dict[str, list], shard: Shard, progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
        kept = self.kept.get(shard.index)
        if kept is None or kept.height == 0:
            return score_shard(rows, shard, self.mapping, self.template, self.tokenizer, self.backend, self.config, progress)
        # Score only the rows the interrupted run had not finished, then put the shard together.
        done = set(kept["srd_id"].to_list())
        todo = [i for i in range(shard.stop - shard.start) if shard.start + i not in done]
        subset = {column: [values[i] for i in todo] for column, values in rows.items()}
        ids = [shard.start + i for i in todo]
        kept = kept.select(list(SHARD_SCHEMA)).cast(SHARD_SCHEMA)  # type: ignore[arg-type]
        try:
            frame = score_shard(subset, shard, self.mapping, self.template, self.tokenizer, self.backend, self.config, progress, ids) if todo else kept.clear()
        except ShardInterrupted as stop:
            raise ShardInterrupted(shard, pl.concat([kept, stop.frame]).sort("srd_id")) from None
        return pl.concat([kept, frame]).sort("srd_id")

    def close(self) -> None:
        """Release the backend (a vLLM engine holds GPU or host memory and child processes until then)."""
        self.backend.close()
