"""``srdata.score``: the whole scoring run, in one straight line.

load -> render prompts -> tokenize -> generate + score -> metrics -> rank -> write
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import polars as pl

from srdata import __version__
from srdata.backends import GenerationParams, check_device, select_backend
from srdata.config import ScoreConfig, build_config, merge, nest, result_settings, settings_hash
from srdata.steps.context import check_pair_lengths, check_token_limits, model_max_positions, model_stop_ids
from srdata.steps.load import ColumnMapping, header_warnings, load_split, resolve_columns
from srdata.engines import ShardJob, run_shards
from srdata.steps.prompts import chat_affixes, describe_template, render_rows, resolve_template, row_problem, unconditional_prompt
from srdata.steps.rank import rank
from srdata.steps.rouge import rouge_l
from srdata.run.folder import RunStore, Shard, plan_shards
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


class InvalidRowError(ValueError):
    """A row cannot be scored and the policy is ``--on-invalid error``."""


@dataclass
class ScoreResult:
    """Where a run's outputs are, and its manifest."""

    output: Path
    annotated_path: Path
    manifest: dict[str, Any]

    def to_polars(self) -> pl.DataFrame:
        return pl.read_parquet(self.annotated_path)


def score(config: ScoreConfig | dict[str, Any] | None = None, *, progress: bool = True, echo: Callable[[str], None] | None = None, **settings: Any) -> ScoreResult:
    """Annotate a dataset with the student's output, ROUGE-L, cross-entropy and SRD ranks.

    Settings may be a :class:`ScoreConfig`, a dict (nested or flat), keyword arguments
    named like the CLI flags, or a mix (keywords win).

    Example:
        >>> result = srdata.score(dataset="train.jsonl", model="path/to/student",
        ...                       output="runs/a", max_new_tokens=128)           # doctest: +SKIP
        >>> result.to_polars().sort("difficulty_rank").head()                     # doctest: +SKIP
    """
    config = _as_config(config, settings)
    say = echo or log.info
    check_device(config.model.device)  # before any work: a GPU that is not there fails now, not after loading
    started = time.perf_counter()

    # load
    dataset = load_split(config.data.dataset, config.data.split, config.data.limit)
    mapping = resolve_columns(dataset.column_names, config.data.prompt_column, config.data.response_column, config.data.input_column)
    clashing = [c for c in dataset.column_names if c in SCORE_COLUMNS + RANK_COLUMNS + ["stage"]]
    if clashing:
        raise ValueError(f"the dataset already has column(s) {', '.join(clashing)} that srdata writes; rename or drop them first")
    if len(dataset) == 0:
        raise ValueError(f"dataset {config.data.dataset} (split '{config.data.split}') has 0 rows: nothing to score")
    say(f"columns: {mapping.describe()}")
    for warning in header_warnings(config.data.dataset):
        say(f"warning: {warning}")
    if mapping.prompt_column is not None and mapping.prompt_column == mapping.response_column:
        say(f"warning: column '{mapping.prompt_column}' is both the prompt and the response: the student is asked "
            "to repeat its prompt; pass --prompt-column and --response-column to choose two columns")
    tokenizer = _load_tokenizer(config)
    template = resolve_template(config.prompt.template, mapping, dataset.column_names, tokenizer)
    say(describe_template(config.prompt.template, template, mapping))
    p = config.prompt
    check_token_limits(
        _max_positions(config), max_prompt_tokens=p.max_prompt_tokens,
        max_new_tokens=config.generation.max_new_tokens, max_reference_tokens=p.max_reference_tokens,
    )
    invalid = _check_rows(dataset, mapping, config.run.on_invalid)
    uncond_text = unconditional_prompt(template, mapping, tokenizer) if "ifd" in config.metrics.signals else None
    if uncond_text is not None:
        say(f"signals: ce_loss_uncond, ifd and pmi, from the reference after the empty prompt {uncond_text!r}")

    # prepare the run folder (refuses other settings; resumes the same ones)
    store = RunStore(config.run.output)
    settings = result_settings(config)
    settings["prompt"]["template"] = template  # what was rendered decides the values, not "auto"
    identity = {"model": model_identity(config.model.model), "dataset": getattr(dataset, "_fingerprint", None), "rows": len(dataset)}
    resumed = store.prepare(settings, identity, config.run.overwrite)
    shards = plan_shards(len(dataset), config.batching.shard_size)
    pending = [s for s in shards if not store.is_done(s)]
    manifest = _manifest(config, settings, identity, mapping, template, shards, pending, tokenizer)
    manifest["resumed"] = resumed
    if uncond_text is not None:
        manifest["unconditional_prompt"] = uncond_text
    if resumed:  # keep how the finished shards were scored
        earlier = {s["index"]: s for s in (store.previous_manifest or {}).get("shards", [])}
        for entry in manifest["shards"]:
            if entry["done"]:
                entry.update({k: v for k, v in earlier.get(entry["index"], {}).items() if k in ("batch_size", "token_budget")})
    store.write_manifest(manifest)
    if resumed:
        say(f"resuming {store.dir}: {len(shards) - len(pending)} of {len(shards)} shards already done")

    # generate + score, shard by shard: in this process, or on Ray actors (--engine ray)
    work = {"seconds": 0.0, "rows": 0, "tokens": 0}

    def save_shard(shard: Shard, frame: pl.DataFrame, seconds: float) -> None:
        work["seconds"] += seconds
        work["rows"] += frame["ce_loss"].is_not_null().sum()
        work["tokens"] += int(frame.select(pl.sum("prompt_tokens") + pl.sum("reference_tokens") + pl.sum("output_tokens")).item() or 0)
        store.write_shard(shard, frame)
        # Batching changes float32 summation order, so values may differ in the last digits
        # between shards scored with other batch settings (a resumed run): record them per shard.
        manifest["shards"][shard.index].update(done=True, batch_size=config.batching.batch_size, token_budget=config.batching.token_budget)
        store.write_manifest(manifest)

    if pending:
        job = ShardJob(dataset, mapping, template, tokenizer, config)
        run_shards(config.engine.engine, job, pending, save_shard, progress=progress)

    # rank + write
    scored = store.read_shards(shards)
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in SHARD_SCHEMA.items() if name not in scored.columns]
    if missing:  # every shard was written before these columns existed
        scored = scored.with_columns(missing).select(list(SHARD_SCHEMA))
    if config.run.on_invalid == "skip":
        scored = scored.filter(pl.col("invalid_reason").is_null())
    original = pl.from_arrow(dataset.with_format("arrow")[:]).with_row_index("srd_id").with_columns(pl.col("srd_id").cast(pl.Int64))
    annotated = rank(original.join(scored, on="srd_id", how="inner"), rrf_k=config.metrics.rrf_k)
    store.write_annotated(annotated)

    manifest.update(status="complete", counts=_counts(scored, len(dataset), invalid), timings=_timings(work, started))
    store.write_manifest(manifest)
    say(f"wrote {store.annotated_path} ({annotated.height} rows)")
    return ScoreResult(store.dir, store.annotated_path, manifest)


def score_shard(
    rows: dict[str, list], shard: Shard, mapping: ColumnMapping, template: str, tokenizer: Any, backend: Any,
    config: ScoreConfig, on_progress: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """Score one shard's rows: render, tokenize, score references, generate, ROUGE-L (and the asked signals)."""
    rendered = render_rows(rows, mapping, template, tokenizer)
    valid = [i for i, r in enumerate(rendered) if r.invalid_reason is None]
    encoding = _encoding_options(config, template, tokenizer)
    pairs = encode_pairs(
        tokenizer,
        [rendered[i].prompt_text for i in valid],
        [rendered[i].reference for i in valid],
        max_reference_tokens=config.prompt.max_reference_tokens,
        **encoding,
    )
    prompt_ids = [p.prompt_ids for p in pairs]
    if config.prompt.max_reference_tokens is None:  # uncapped references: check each row's length
        check_pair_lengths(prompt_ids, [p.reference_ids for p in pairs], [shard.start + i for i in valid], _max_positions(config))
    eos_id = resolve_eos_id(tokenizer)  # the one appended to references; the model's own end ids also stop generation
    stop_ids = (eos_id, *(i for i in model_stop_ids(config.model.model) if i != eos_id))
    params = GenerationParams(config.generation.max_new_tokens, config.generation.no_repeat_ngram_size, stop_ids)
    ce_losses, generations = backend.score_and_generate(prompt_ids, [p.reference_ids for p in pairs], params, on_progress)
    rouge = rouge_l([g.text for g in generations], [rendered[i].reference for i in valid], tokenizer=config.metrics.rouge_tokenizer)
    uncond_losses: list[float | None] = [None] * len(valid)
    if "ifd" in config.metrics.signals and valid:
        # The same reference ids after the template's empty prompt: one more forward over
        # a short shared prompt and the reference tokens (no generation).
        uncond_ids = unconditional_prompt_ids(tokenizer, unconditional_prompt(template, mapping, tokenizer), **encoding)
        uncond_losses = backend.score([uncond_ids] * len(pairs), [p.reference_ids for p in pairs], on_progress)

    n = shard.stop - shard.start
    columns: dict[str, list] = {name: [None] * n for name in SHARD_SCHEMA}
    columns["srd_id"] = list(range(shard.start, shard.stop))
    for i, r in enumerate(rendered):
        columns["invalid_reason"][i] = r.invalid_reason
        columns["prompt_text"][i] = r.prompt_text
        columns["reference_text"][i] = r.reference
    for k, i in enumerate(valid):
        pair, generation = pairs[k], generations[k]
        columns["student_output"][i] = generation.text
        columns["finish_reason"][i] = generation.finish_reason
        columns["prompt_tokens"][i] = len(pair.prompt_ids)
        columns["reference_tokens"][i] = len(pair.reference_ids)
        columns["output_tokens"][i] = len(generation.token_ids)
        columns["prompt_truncated"][i] = pair.prompt_truncated
        columns["reference_truncated"][i] = pair.reference_truncated
        columns["rouge_l"][i] = rouge[k]
        columns["ce_loss"][i] = ce_losses[k]
        if uncond_losses[k] is not None:
            columns["ce_loss_uncond"][i] = uncond_losses[k]
            columns["ifd"][i] = instruction_following_difficulty(ce_losses[k], uncond_losses[k])
            columns["pmi"][i] = prompt_pmi(ce_losses[k], uncond_losses[k], len(pair.reference_ids))
    return pl.DataFrame(columns, schema=SHARD_SCHEMA)


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


def _encoding_options(config: ScoreConfig, template: str, tokenizer: Any) -> dict[str, Any]:
    """How every prompt of the run is encoded (the rows' and the unconditional one)."""
    return dict(
        max_prompt_tokens=config.prompt.max_prompt_tokens,
        truncation_side=config.prompt.truncation_side,
        add_special_tokens=template != "chat",  # chat templates write their own special tokens
        keep=chat_affixes(tokenizer) if template == "chat" else ("", ""),  # truncation never cuts the turn markers
    )


# ---------------------------------------------------------------------------- helpers
def _as_config(config: ScoreConfig | dict[str, Any] | None, settings: dict[str, Any]) -> ScoreConfig:
    if isinstance(config, ScoreConfig):
        if not settings:
            return config
        config = config.model_dump()
    return build_config(merge(nest(config or {}), nest(settings)))


def _load_tokenizer(config: ScoreConfig) -> Any:
    from transformers import AutoTokenizer

    model = config.model.model
    if Path(model).is_file():
        raise FileNotFoundError(
            f"--model {model} is a file; pass the folder that save_pretrained wrote (the one holding config.json "
            "and the tokenizer files), or a hub id"
        )
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise FileNotFoundError(f"model folder {model} does not exist; pass a folder saved with save_pretrained or a hub id")
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


def _check_rows(dataset: Any, mapping: ColumnMapping, policy: str) -> dict[int, str]:
    """Find unscorable rows up front, so ``--on-invalid error`` fails before any model work."""
    columns = [c for c in (mapping.prompt_column, mapping.response_column, mapping.input_column, mapping.messages_column) if c]
    invalid: dict[int, str] = {}
    offset = 0
    for batch in dataset.select_columns(columns).iter(batch_size=10_000):
        n = len(batch[columns[0]])
        for i in range(n):
            problem = row_problem({c: batch[c][i] for c in columns}, mapping)
            if problem:
                invalid[offset + i] = problem
        offset += n
    if invalid and policy == "error":
        examples = "; ".join(f"row {i}: {why}" for i, why in list(invalid.items())[:5])
        more = f" (and {len(invalid) - 5} more)" if len(invalid) > 5 else ""
        raise InvalidRowError(
            f"{len(invalid)} row(s) cannot be scored: {examples}{more}. Fix the data, or pass "
            "--on-invalid skip (leave them out) or --on-invalid flag (keep them with empty scores)"
        )
    return invalid


def model_identity(model: str) -> dict[str, Any]:
    """A cheap fingerprint of a local model folder (config bytes, weight file names and sizes)."""
    path = Path(model)
    if not path.is_dir():
        return {"name": model}
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.name.startswith("tokenizer"):
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return {"name": str(path.resolve()), "fingerprint": digest.hexdigest()[:16]}


def _max_positions(config: ScoreConfig) -> int | None:
    """The model's positions; vLLM's ``--max-model-len`` lowers them (the transformers backend ignores it)."""
    vllm = select_backend(config.model.backend) == "vllm"
    return model_max_positions(config.model.model, config.model.max_model_len if vllm else None)


def _backend_options(config: ScoreConfig) -> dict[str, Any]:
    m = config.model
    if select_backend(m.backend) == "vllm":
        return dict(
            dtype=m.dtype, seed=config.run.seed, gpu_memory_utilization=m.gpu_memory_utilization,
            max_model_len=m.max_model_len, max_num_batched_tokens=m.max_num_batched_tokens,
            tensor_parallel_size=m.tensor_parallel_size,
            # vLLM has no such sampling parameter: the engine registers a logits processor for it.
            no_repeat_ngram_size=config.generation.no_repeat_ngram_size,
        )
    return dict(device=m.device, dtype=m.dtype, batch_size=config.batching.batch_size, token_budget=config.batching.token_budget)


def _versions() -> dict[str, str]:
    versions = {"srdata": __version__}
    for name in ("torch", "transformers", "datasets", "polars", "rapidfuzz", "nltk", "vllm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _manifest(config, settings, identity, mapping, template, shards, pending, tokenizer) -> dict[str, Any]:
    return {
        "srdata_version": __version__,
        "status": "running",
        "config": config.model_dump(),
        "settings": settings,
        "config_hash": settings_hash({"settings": settings, "identity": identity}),
        "identity": identity,
        "backend": select_backend(config.model.backend),
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer), "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token},
        "columns": mapping.to_dict(),
        "template": template,
        "versions": _versions(),
        "shards": [{"index": s.index, "file": s.file, "start": s.start, "stop": s.stop, "done": s not in pending} for s in shards],
    }


def _counts(scored: pl.DataFrame, n_input: int, invalid: dict[int, str]) -> dict[str, int]:
    valid = scored.filter(pl.col("invalid_reason").is_null())
    return {
        "rows_input": n_input,
        "rows_scored": valid.height,
        "rows_invalid": len(invalid),
        "rows_skipped": n_input - scored.height,
        "rows_flagged": scored.height - valid.height,
        "prompts_truncated": int(valid["prompt_truncated"].sum()),
        "references_truncated": int(valid["reference_truncated"].sum()),
        "finished_by_length": int((valid["finish_reason"] == "length").sum()),
    }


def _timings(work: dict[str, float], started: float) -> dict[str, float]:
    """Timings of this call; throughput counts the rows it scored (a resumed call scores fewer)."""
    timings = {
        "total_seconds": round(time.perf_counter() - started, 3),
        "scoring_seconds": round(work["seconds"], 3),
        "rows_scored_this_call": int(work["rows"]),
        "tokens_this_call": int(work["tokens"]),
    }
    if work["seconds"] > 0:
        timings["rows_per_second"] = round(work["rows"] / work["seconds"], 3)
        timings["tokens_per_second"] = round(work["tokens"] / work["seconds"], 1)
    return timings


class _ProgressBar:
    """tqdm bar fed by the backends: rows finished, with tokens/s alongside."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="row", desc="scoring", disable=not enabled, dynamic_ncols=True)
        self.tokens = 0
        self.start = self.shown = time.perf_counter()

    def update_work(self, rows: int, tokens: int) -> None:
        """Backends report tokens as they go (per batch, per decode step) and rows as they finish."""
        self.tokens += tokens
        now = time.perf_counter()
        self.bar.set_postfix_str(f"{self.tokens / max(now - self.start, 1e-9):,.0f} tok/s", refresh=False)
        if rows:
            self.bar.update(rows)  # tqdm refreshes, with rows/s and the ETA
        elif now - self.shown >= 1.0:  # no row finished yet (long batches): still show the tokens moving
            self.bar.refresh()
        else:
            return
        self.shown = now

    def close(self) -> None:
        self.bar.close()
