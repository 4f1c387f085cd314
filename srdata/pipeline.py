"""``srdata.score``: the whole scoring run, in one straight line.

load -> render prompts -> tokenize -> generate + score -> metrics -> rank -> write
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import polars as pl

from srdata import __version__
from srdata.backends import check_device, decode_attention_kernel, resolve_run_dtype, select_backend
from srdata.config import ScoreConfig, build_config, merge, nest, result_settings, settings_hash
from srdata.steps.context import check_token_limits
from srdata.steps.columns import RANK_COLUMNS, SCORE_COLUMNS, SHARD_SCHEMA
from srdata.steps.dataset import ColumnMapping, header_warnings, load_split_with_identity, resolve_columns
from srdata.engines import ShardJob, run_shards
from srdata.engines.replica import BACKEND_ON_REPLICAS, earlier_records, record_replica, resume_mismatch, who
from srdata.shard import StudentScorer, check_model_path, load_tokenizer, max_positions
from srdata.steps.hub import check_hub_model, hub_offline
from srdata.interrupt import Kept, ScoreInterrupted, kept_partials, save_interrupted
from srdata.steps.truncation import truncation_after, truncation_before
from srdata.steps.prompts import describe_template, resolve_template, resolved_config, row_problem, unconditional_prompt
from srdata.curriculum.ranking_record import ranking_metadata
from srdata.steps.rank import DEFAULT_RANK_BY, rank
from srdata.run.folder import Manifest, RunStore, Shard, ShardRecord, check_output_location, plan_shards
from srdata.run.identity import model_identity, require_safetensors
from srdata.run.remote_run import open_run_store
from srdata.run.storage import use_options

log = logging.getLogger(__name__)

class InvalidRowError(ValueError):
    """A row cannot be scored and the policy is ``--on-invalid error``."""


@dataclass
class ScoreResult:
    """Where a run's outputs are, and its manifest."""

    output: Path | str  # a remote run (s3://...) is named by its URI
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
    started = time.perf_counter()
    # Before any work: a GPU that is not there, pickle-only weights, an output folder that the
    # loader would read or that holds files of the user's fail now, having touched nothing.
    if config.engine.name != "ray":  # on Ray each replica checks the device where it runs (srdata.engines.replica)
        check_device(config.model.device)
    require_safetensors(config.model.path)
    with use_options(config.run.storage_options):  # remote data or --output (s3://...): srdata.run.storage
        check_output_location(config.data.dataset, config.run.output)
        store = open_run_store(config.run.output)  # s3://...: staged and published (srdata.run.remote_run)
        store.check_foreign(config.run.overwrite)
        # One writer per folder, from here to the end: a second command is refused at once, before
        # it loads anything (the lock is taken before the manifest is read, and dropped if killed).
        with store.lock("srdata score"):
            kept = Kept(store)
            try:
                return _score(config, store, say, progress, started, kept)
            except KeyboardInterrupt as stop:  # save what is finished, and say exactly that
                raise ScoreInterrupted(save_interrupted(kept, stop)) from None


def _score(config: ScoreConfig, store: RunStore, say: Callable[[str], None], progress: bool, started: float, kept: Kept) -> ScoreResult:
    """The run itself, holding the folder's lock."""
    # the model first: a typo in its folder, or a hub id offline, fails before the (slow) data load
    check_model_path(config.model.path)
    note = check_hub_model(config.model.path)
    if note:
        say(note)
    with hub_offline(note is not None):
        return _score_checked(config, store, say, progress, started, kept)


def _score_checked(config: ScoreConfig, store: RunStore, say: Callable[[str], None], progress: bool, started: float, kept: Kept) -> ScoreResult:
    """The run, once the model is known to be reachable (or cached while offline)."""
    say(f"loading the tokenizer of {config.model.path}")
    tokenizer = load_tokenizer(config)
    say(f"loading {config.data.dataset}" + (f" (split {config.data.split})" if config.data.split != "train" else ""))
    dataset, data_identity = load_split_with_identity(config.data.dataset, config.data.split, config.data.limit)
    d = config.data
    mapping = resolve_columns(dataset.column_names, d.prompt_column, d.response_column, d.input_column, d.messages_column)
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
    template = resolve_template(config.prompt.template, mapping, dataset.column_names, tokenizer)
    say(describe_template(config.prompt.template, template, mapping))
    p = config.prompt
    check_token_limits(
        max_positions(config), max_prompt_tokens=p.max_prompt_tokens,
        max_new_tokens=config.generation.max_new_tokens, max_reference_tokens=p.max_reference_tokens,
    )
    invalid = _check_rows(dataset, mapping, config.run.on_invalid)
    uncond_text = unconditional_prompt(template, mapping, tokenizer) if "ifd" in config.metrics.signals else None
    if uncond_text is not None:
        say(f"signals: ce_loss_uncond, ifd and pmi, from the reference after the empty prompt {uncond_text!r}")

    # --dtype auto resolved once, here, where the local engine computes: every shard is scored in
    # it and a resume checks it. (A Ray replica resolves it on its own node.)
    requested, dtype, dtype_reason = config.model.dtype, config.model.dtype, "resolved on each Ray replica's node"
    if config.engine.name == "local":
        dtype, dtype_reason = resolve_run_dtype(config.model.backend, config.model.device, requested)
        say(f"dtype: {dtype} ({dtype_reason})")
        config = config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})})
    # prepare the run folder (refuses other settings; resumes the same ones). The resume settings
    # are the user's as given (columns auto-detected stay None, as runs before recorded them),
    # with the template that was rendered: what decides the values, not "auto".
    settings = result_settings(config)
    settings["prompt"]["template"] = template
    # From here on the template and the columns are in the config, resolved once: shards,
    # engines, Ray replicas and the manifest read them there.
    config = resolved_config(config, mapping, template)
    identity = {"model": model_identity(config.model.path), "dataset": data_identity, "rows": len(dataset)}
    resumed = store.prepare(settings, identity, config.run.overwrite)
    shards = plan_shards(len(dataset), config.batching.shard_size)
    pending = store.pending(shards, say)
    manifest = _manifest(config, settings, identity, mapping, shards, pending, tokenizer)
    manifest.resumed = resumed
    manifest.precision = {"dtype": dtype, "requested": requested, "reason": dtype_reason}
    if config.engine.name == "local":
        manifest.precision["decode_attention"] = decode_attention_kernel(config.model.backend, config.model.device, dtype)
    if uncond_text is not None:
        manifest.unconditional_prompt = uncond_text
    if resumed:  # keep how the finished shards were scored, and their checksums
        for entry in manifest.shards:
            earlier = store.records.get(entry.file)
            if entry.done and earlier is not None:
                for key in {"batch_size", "token_budget", "sha256", "bytes", "rows"} & earlier.model_fields_set:
                    setattr(entry, key, getattr(earlier, key))
    partials = kept_partials(store, manifest, pending, say)
    # A resume must compute as the call that scored the finished rows did (srdata.engines.replica)
    scored_by = earlier_records(store.previous_manifest) if resumed and (len(pending) < len(shards) or partials) else []
    _check_resume(config, manifest, dtype, scored_by)
    store.write_manifest(manifest)
    kept.manifest = manifest
    if resumed:
        say(f"resuming {store.dir}: {len(shards) - len(pending)} of {len(shards)} shards already done"
            + (f", {sum(f.height for f in partials.values())} rows of unfinished shards kept" if partials else ""))
    for warning in truncation_before(dataset, tokenizer, config, pending):
        say(f"warning: {warning}")

    # generate + score, shard by shard: in this process, or on Ray actors (--engine ray)
    work = {"seconds": 0.0, "rows": 0, "tokens": 0}

    def save_shard(shard: Shard, frame: pl.DataFrame, seconds: float) -> None:
        work["seconds"] += seconds
        work["rows"] += frame["ce_loss"].is_not_null().sum()
        work["tokens"] += int(frame.select(pl.sum("prompt_tokens") + pl.sum("reference_tokens") + pl.sum("output_tokens")).item() or 0)
        written = store.write_shard(shard, frame)
        # Batching changes float32 summation order, so values may differ in the last digits
        # between shards scored with other batch settings (a resumed run): record them per shard.
        entry = manifest.shards[shard.index]
        entry.done, entry.batch_size, entry.token_budget = True, config.batching.batch_size, config.batching.token_budget
        entry.sha256, entry.bytes, entry.rows = written["sha256"], written["bytes"], written["rows"]
        store.write_manifest(manifest)
        kept.shard_done(entry)

    if pending:
        rows = sum(s.stop - s.start for s in pending) - sum(f.height for f in partials.values())
        backend = "backend and dtype resolved on each replica" if config.engine.name == "ray" else manifest.backend  # not the driver's guess
        say(f"loading the student {config.model.path} ({backend}, {config.engine.name} engine), then scoring "
            f"{rows} rows in {len(pending)} shard(s) of up to {config.batching.shard_size}")
        job = ShardJob(dataset, config, tokenizer, open_student=partial(StudentScorer, kept=partials), model_identity=identity["model"],
                       on_replica=partial(record_replica, manifest, write=store.write_manifest), earlier_replicas=scored_by)
        run_shards(config.engine.name, job, pending, save_shard, progress=progress)

    # rank + write
    say(f"ranking {len(dataset)} rows")
    scored = store.read_shards(manifest.shards)
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in SHARD_SCHEMA.items() if name not in scored.columns]
    if missing:  # every shard was written before these columns existed
        scored = scored.with_columns(missing).select(list(SHARD_SCHEMA))
    if config.run.on_invalid == "skip":
        scored = scored.filter(pl.col("invalid_reason").is_null())
    original = pl.from_arrow(dataset.with_format("arrow")[:]).with_row_index("srd_id").with_columns(pl.col("srd_id").cast(pl.Int64))
    annotated = rank(original.join(scored, on="srd_id", how="inner"), rrf_k=config.metrics.rrf_k)
    say(f"writing {store.annotated_path}")
    # The file says which ranking its rank columns are (the paper's here; `srdata rank` may change it later).
    store.write_annotated(annotated, metadata=ranking_metadata(DEFAULT_RANK_BY, config.metrics.rrf_k, "input"))

    manifest.status, manifest.counts, manifest.timings = "complete", _counts(scored, len(dataset), invalid), _timings(work, started)
    store.write_manifest(manifest)
    say(f"wrote {store.annotated_path} ({annotated.height} rows)")
    for warning in truncation_after(scored, tokenizer, config):
        say(f"warning: {warning}")
    return ScoreResult(store.output, store.annotated_path, manifest.to_json())


# ---------------------------------------------------------------------------- helpers
def _as_config(config: ScoreConfig | dict[str, Any] | None, settings: dict[str, Any]) -> ScoreConfig:
    if isinstance(config, ScoreConfig):
        if not settings:
            return config
        config = config.model_dump()
    return build_config(merge(nest(config or {}), nest(settings)))


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


def _versions() -> dict[str, str]:
    from srdata.backends import backend_packages  # every registered backend's packages (it declares them)

    versions = {"srdata": __version__}
    for name in ("torch", "transformers", "datasets", "polars", "rapidfuzz", "nltk", *backend_packages()):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _manifest(config, settings, identity, mapping, shards, pending, tokenizer) -> Manifest:
    """The run's manifest: ``config`` is resolved, so it records the rendered template (once, in ``config.prompt.template``)."""
    return Manifest(
        srdata_version=__version__,
        status="running",
        config=config.model_dump(),
        settings=settings,
        config_hash=settings_hash({"settings": settings, "identity": identity}),
        identity=identity,
        backend=BACKEND_ON_REPLICAS if config.engine.name == "ray" else select_backend(config.model.backend),  # Ray: as reported
        tokenizer={"class": type(tokenizer).__name__, "vocab_size": len(tokenizer), "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token},
        columns=mapping.to_dict(),
        versions=_versions(),
        shards=[ShardRecord(index=s.index, file=s.file, start=s.start, stop=s.stop, done=s not in pending) for s in shards],
    )


def _check_resume(config: ScoreConfig, manifest: Manifest, dtype: str, earlier: list[dict[str, Any]]) -> None:
    """Refuse a local resume that would compute otherwise than the call that scored the finished rows; on Ray keep
    that call's records (each replica is compared with them where it runs) and record the backend only as reported.
    """
    if config.engine.name != "ray":
        problem = resume_mismatch({"replica": None, "backend": manifest.backend, "dtype": dtype}, earlier)
        if problem:
            raise ValueError(problem)
        return
    replicas = [r for r in earlier if r.get("replica") is not None]
    if replicas:  # the records of the replicas that scored the finished shards stay in the manifest
        manifest.replicas = replicas
    first = next((r for r in earlier if r.get("dtype")), None)
    if first is not None and manifest.precision.get("dtype") == "auto":  # what the finished shards were scored in
        manifest.precision = {**manifest.precision, "dtype": first["dtype"], "reason": f"{first.get('dtype_reason', 'recorded')}, on {who(first)}"}
    manifest.backend = next((r["backend"] for r in earlier if r.get("backend")), BACKEND_ON_REPLICAS)


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


