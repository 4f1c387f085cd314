"""Score one shard: render prompts -> tokenize -> generate + score -> metrics.

What every engine runs on its rows (in this process or on a Ray actor), with the
tokenizer and the student backend this module also knows how to load. It does not
know who calls it: :func:`srdata.pipeline.score` plans the shards and writes them.
The config it receives is resolved (:func:`srdata.steps.prompts.resolved_config`): its
``prompt.template`` and ``data`` columns are the run's concrete ones.

The output schema lives in :mod:`srdata.steps.columns`, the IFD/PMI formulas in
:mod:`srdata.steps.signals` (both importable from here as before).

Example:
    >>> frame = score_shard(rows, shard, tokenizer, backend, config)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import polars as pl

from srdata.backends import GenerationParams, backend_class, load_backend
from srdata.config import ScoreConfig
from srdata.steps.columns import RANK_COLUMNS, SCORE_COLUMNS, SHARD_SCHEMA  # noqa: F401 - re-exported (srdata.shard held them)
from srdata.steps.context import check_pair_lengths, model_stop_ids
from srdata.steps.dataset import ColumnMapping, column_mapping
from srdata.steps.prompts import render_rows, resolved_config, unconditional_prompt
from srdata.steps.rouge import rouge_l
from srdata.steps.signals import instruction_following_difficulty, prompt_pmi  # noqa: F401 - re-exported as well
from srdata.run.folder import Shard
from srdata.steps.tokenize import encode_pairs, prompt_encoding, resolve_eos_id, unconditional_prompt_ids

log = logging.getLogger(__name__)


class ShardInterrupted(KeyboardInterrupt):
    """Ctrl-C while a shard was scored: ``frame`` holds its rows that were finished (a subset, by srd_id)."""

    def __init__(self, shard: Shard, frame: pl.DataFrame) -> None:
        super().__init__(f"interrupted in shard {shard.index} with {frame.height} of its rows finished")
        self.shard, self.frame = shard, frame


def score_shard(
    rows: dict[str, list], shard: Shard, tokenizer: Any, backend: Any, config: ScoreConfig,
    on_progress: Callable[[int, int], None] | None = None, srd_ids: list[int] | None = None,
) -> pl.DataFrame:
    """Score one shard's rows: render, tokenize, score references, generate, ROUGE-L (and the asked signals).

    ``config`` is the run's resolved config (its template and columns). ``srd_ids`` names the
    rows when they are not all of the shard's (a resumed partial shard). A Ctrl-C raises
    :class:`ShardInterrupted` holding every row that was finished.
    """
    ids = list(range(shard.start, shard.stop)) if srd_ids is None else srd_ids
    rendered, valid, pairs = encode_shard(rows, shard, tokenizer, config, ids)
    prompt_ids = [p.prompt_ids for p in pairs]
    references = [p.reference_ids for p in pairs]
    eos_id = resolve_eos_id(tokenizer)  # the one appended to references; the model's own end ids also stop generation
    stop_ids = (eos_id, *(i for i in model_stop_ids(config.model.path) if i != eos_id))
    params = GenerationParams(config.generation.max_new_tokens, config.generation.no_repeat_ngram_size, stop_ids)
    uncond: dict[int, float] | None = None
    if "ifd" in config.metrics.signals and valid:
        # The same reference ids after the template's empty prompt: one more forward over a short
        # shared prompt and the reference tokens (no generation). Before generation, so that a
        # Ctrl-C during the long generation still keeps the rows it finished.
        empty_prompt = unconditional_prompt(config.prompt.template, column_mapping(config), tokenizer)
        uncond_ids = unconditional_prompt_ids(tokenizer, empty_prompt, **_prompt_encoding(config, tokenizer))
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
    rows: dict[str, list], shard: Shard, tokenizer: Any, config: ScoreConfig, srd_ids: list[int] | None = None,
) -> tuple[list[Any], list[int], list[Any]]:
    """Render and tokenize a shard's rows: ``(rendered rows, positions of the valid ones, their encoded pairs)``.

    The one encoding of a run: the scoring pass and the teacher pass both call it, so the
    teacher sees exactly the ids the student was scored on (``config`` is resolved: its
    template and columns are the run's).
    """
    rendered = render_rows(rows, column_mapping(config), config.prompt.template, tokenizer)
    valid = [i for i, r in enumerate(rendered) if r.invalid_reason is None]
    pairs = encode_pairs(
        tokenizer,
        [rendered[i].prompt_text for i in valid],
        [rendered[i].reference for i in valid],
        max_reference_tokens=config.prompt.max_reference_tokens,
        **_prompt_encoding(config, tokenizer),
    )
    if config.prompt.max_reference_tokens is None:  # uncapped references: check each row's length
        ids = list(range(shard.start, shard.stop)) if srd_ids is None else srd_ids
        check_pair_lengths([p.prompt_ids for p in pairs], [p.reference_ids for p in pairs], [ids[i] for i in valid], max_positions(config))
    return rendered, valid, pairs


def _prompt_encoding(config: ScoreConfig, tokenizer: Any) -> dict[str, Any]:
    """How every prompt of the run is encoded (the rows' and the unconditional one): srdata's one rule."""
    p = config.prompt
    return prompt_encoding(p.template, tokenizer, max_prompt_tokens=p.max_prompt_tokens, truncation_side=p.truncation_side)


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

    model = config.model.path
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


class StudentScorer:
    """The student loaded once (tokenizer + backend), scoring whole shards: what every engine calls.

    Engines receive this class (``ShardJob.open_student``) and call it where they run: in
    this process, or once per Ray actor; they never import the scoring code themselves.
    ``config`` is the run's resolved config (:func:`srdata.steps.prompts.resolved_config`).
    (Called ``LoadedStudent`` before; that name still works, with a DeprecationWarning.)

    Example:
        >>> student = StudentScorer(config)                         # doctest: +SKIP
        >>> frame = student(rows, Shard(0, 0, 100))                 # doctest: +SKIP
        >>> student.close()                                         # doctest: +SKIP
    """

    def __init__(self, config: ScoreConfig, tokenizer: Any = None, kept: dict[int, pl.DataFrame] | None = None) -> None:
        self.config = config
        self.kept = kept or {}  # shard index -> its rows finished by an interrupted run (verified by the caller)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        self.backend = load_backend(config, tokenizer=self.tokenizer)

    def __call__(self, rows: dict[str, list], shard: Shard, progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
        kept = self.kept.get(shard.index)
        if kept is None or kept.height == 0:
            return score_shard(rows, shard, self.tokenizer, self.backend, self.config, progress)
        # Score only the rows the interrupted run had not finished, then put the shard together.
        done = set(kept["srd_id"].to_list())
        todo = [i for i in range(shard.stop - shard.start) if shard.start + i not in done]
        subset = {column: [values[i] for i in todo] for column, values in rows.items()}
        ids = [shard.start + i for i in todo]
        kept = kept.select(list(SHARD_SCHEMA)).cast(SHARD_SCHEMA)  # type: ignore[arg-type]
        try:
            frame = score_shard(subset, shard, self.tokenizer, self.backend, self.config, progress, ids) if todo else kept.clear()
        except ShardInterrupted as stop:
            raise ShardInterrupted(shard, pl.concat([kept, stop.frame]).sort("srd_id")) from None
        return pl.concat([kept, frame]).sort("srd_id")

    def close(self) -> None:
        """Release the backend (a vLLM engine holds GPU or host memory and child processes until then)."""
        self.backend.close()


class _LoadedStudent(StudentScorer):
    """``LoadedStudent(config, mapping, template, tokenizer, kept)``: the old signature, resolved into the config."""

    def __init__(
        self, config: ScoreConfig, mapping: ColumnMapping, template: str, tokenizer: Any = None, kept: dict[int, pl.DataFrame] | None = None
    ) -> None:
        super().__init__(resolved_config(config, mapping, template), tokenizer, kept)


def __getattr__(name: str) -> Any:
    """Old names that still work: ``LoadedStudent`` is :class:`StudentScorer` (with a DeprecationWarning)."""
    if name == "LoadedStudent":
        warnings.warn("srdata.shard.LoadedStudent is renamed srdata.shard.StudentScorer, which takes the resolved config "
                      "(srdata.steps.prompts.resolved_config) instead of config, mapping, template", DeprecationWarning, stacklevel=2)
        return _LoadedStudent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
