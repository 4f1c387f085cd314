"""``srdata teach``: one scoring pass of the teacher over a scored run's exact token ids.

read the run -> check the teacher -> encode (the run's own rule) -> teacher scores -> join -> write

What it adds to a run ``RUN`` (scored by ``srdata score``):

* ``teacher_ce_loss`` (the teacher's mean NLL per reference token, the same tokens as
  ``ce_loss``) and ``excess_ce_loss = ce_loss - teacher_ce_loss`` in ``RUN/annotated.parquet``,
  so every later ``export`` carries them into the stage files;
* ``RUN/teacher/``: its own ``manifest.json`` (teacher identity, settings, shard checksums)
  and ``shards/shard-NNNNN.parquet`` keyed by ``srd_id``, holding per row ``teacher_ce_loss``,
  ``prompt_tokens``, ``reference_tokens``, ``token_ids_sha256`` (what proves alignment) and,
  with ``--top-k K``, the teacher's top-K ids (int32) and log-probs (float16) at every
  reference position;
* a ``teacher`` entry in ``RUN/manifest.json`` (the teacher, K, the vocabulary note).

The same rules as ``srdata score``: one writer (the run folder's lock), resumable shards
with checksums, atomic writes, either engine and either backend. A run holding another
teacher's pass is refused unless ``--overwrite``: two teachers' columns never mix.

Example:
    >>> srdata.teach("runs/a", teacher="models/teacher", top_k=64)     # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import polars as pl

from srdata import __version__
from srdata.backends import check_device, load_backend, resolve_run_dtype, select_backend
from srdata.config import TEACH_SECTIONS, ScoreConfig, TeachConfig, merge, nest, settings_hash
from srdata.engines import ShardJob, run_shards
from srdata.engines.replica import BACKEND_ON_REPLICAS, earlier_records, record_replica, resume_mismatch
from srdata.run.folder import ANNOTATED_FILE, MANIFEST_FILE, Manifest, RunStore, Shard, ShardRecord, plan_shards, read_manifest
from srdata.run.identity import model_identity, require_safetensors
from srdata.run.io import FolderLock
from srdata.run.remote_run import RemoteRunStore, staged_run
from srdata.run.storage import Location, check_bucket, exists, parse_location, use_options
from srdata.shard import encode_shard, load_tokenizer
from srdata.steps.context import model_max_positions
from srdata.steps.dataset import ColumnMapping, load_split_with_identity
from srdata.steps.prompts import resolved_config
from srdata.steps.teacher import TEACHER_COLUMNS, TEACHER_FOLDER, padded_vocabulary_note, teacher_frame, tokenizer_differences

log = logging.getLogger(__name__)

class TeachError(ValueError):
    """The teacher pass cannot run as asked; the message says why and what to do."""


@dataclass
class TeachResult:
    """Where the teacher pass wrote, and its manifest."""

    run: Path | str  # a remote run (s3://...) is named by its URI
    teacher_dir: Path | str
    manifest: dict[str, Any]


def teach(config: TeachConfig | dict[str, Any] | None = None, *, run: str | Path, progress: bool = True,
          echo: Callable[[str], None] | None = None, **settings: Any) -> TeachResult:
    """Run the teacher over the run's encoded pairs: ``teacher_ce_loss``, ``excess_ce_loss`` and optional top-K.

    Example:
        >>> srdata.teach(run="runs/a", teacher="models/qwen-1.5b", top_k=64, device="cpu")   # doctest: +SKIP
    """
    config = _as_teach_config(config, settings)
    say = echo or log.info
    if config.engine.name != "ray":  # on Ray each replica checks the device where it runs (srdata.engines.replica)
        check_device(config.model.device)
    require_safetensors(config.model.path)
    with use_options(config.teach.storage_options):  # a run in object storage (s3://...): srdata.run.storage
        location = parse_location(run if isinstance(run, str) else Path(run), "RUN_DIR")
        if location.is_remote:
            return _teach_remote(config, location, say, progress)
        run_dir = location.local
        _require_run(run_dir, run_dir)
        with FolderLock(run_dir, "srdata teach"):  # it rewrites the run's annotated table and manifest
            return _teach(config, run_dir, say, progress, (RunStore(run_dir), RunStore(run_dir / TEACHER_FOLDER)))


def _teach_remote(config: TeachConfig, location: Location, say: Callable[[str], None], progress: bool) -> TeachResult:
    """The pass on a run in object storage: staged locally, published as ``srdata score`` publishes (srdata.run.remote_run).

    Under the run's lock object: the run's manifest and annotated table (and the teacher
    folder's manifest) are downloaded afresh; every finished teacher shard the stored teacher
    manifest records is downloaded and checked against its SHA-256 before it is trusted
    (:meth:`RemoteRunStore.prepare`); each new shard is uploaded before the teacher manifest
    that records it; ``annotated.parquet`` before the run's ``manifest.json``, which is last.
    """
    check_bucket(location)
    if not exists(location / MANIFEST_FILE):  # before the lock: a wrong location is refused having written nothing
        raise _no_run(location.uri)
    names = [MANIFEST_FILE, ANNOTATED_FILE, f"{TEACHER_FOLDER}/{MANIFEST_FILE}"]
    with staged_run(location, "srdata teach", names) as run_dir:
        _require_run(run_dir, location.uri)
        stores = (RemoteRunStore(location, staging=run_dir), RemoteRunStore(location / TEACHER_FOLDER, staging=run_dir / TEACHER_FOLDER))
        return _teach(config, run_dir, say, progress, stores)


def _require_run(run_dir: Path, shown_as: Path | str) -> None:
    if not (run_dir / MANIFEST_FILE).is_file():
        raise _no_run(shown_as)


def _no_run(shown_as: Path | str) -> TeachError:
    return TeachError(f"{shown_as} holds no scored run (no manifest.json); run `srdata score DATASET --output {shown_as}` first")


def _teach(config: TeachConfig, run_dir: Path, say: Callable[[str], None], progress: bool,
           stores: tuple[RunStore, RunStore]) -> TeachResult:
    """The pass, holding the run's lock; ``stores``: the run folder's and its teacher folder's (local or remote)."""
    started = time.perf_counter()
    run_store, store = stores
    label = run_store.output  # the run as the user named it (its URI for a remote run, whose run_dir is a local copy)
    # read the run: its settings decide the encoding, its dataset must still hold what it scored
    run_manifest = read_manifest(run_dir)
    if run_manifest is None or run_manifest.status != "complete" or not (run_dir / ANNOTATED_FILE).is_file():
        raise TeachError(f"{label} has no finished scores; finish `srdata score` into it (re-run the same command) first")
    student = ScoreConfig.model_validate(run_manifest.config.model_dump())
    dataset, data_identity = load_split_with_identity(student.data.dataset, student.data.split, student.data.limit)
    if data_identity != run_manifest.identity.get("dataset"):
        raise TeachError(
            f"the dataset {student.data.dataset} no longer holds the content {label} scored (it was edited or replaced); "
            "score it again, or restore the data the run scored"
        )
    mapping, template = ColumnMapping(**run_manifest.columns), run_manifest.template
    teacher_config = student.model_copy(
        update={"model": config.model, "engine": config.engine,
                "batching": student.batching.model_copy(update=config.batching.model_dump(exclude={"shard_size"}))}
    )

    # --dtype auto: the scored run's dtype, so excess_ce_loss = ce_loss - teacher_ce_loss compares like with like.
    # A run scored on Ray records "auto" in its config and the dtype its replicas resolved in its precision.
    run_dtype = student.model.dtype if student.model.dtype != "auto" else (getattr(run_manifest, "precision", None) or {}).get("dtype", "auto")
    requested, dtype, dtype_reason = config.model.dtype, config.model.dtype, "resolved on each Ray replica's node"
    if config.engine.name == "local" or (requested == "auto" != run_dtype):  # on Ray too: replicas get the run's dtype
        dtype, dtype_reason = resolve_run_dtype(config.model.backend, config.model.device, run_dtype if requested == "auto" else requested)
        dtype_reason = "auto: the scored run's dtype" if requested == "auto" != run_dtype else dtype_reason
        say(f"teacher dtype: {dtype} ({dtype_reason})")
        teacher_config = teacher_config.model_copy(update={"model": teacher_config.model.model_copy(update={"dtype": dtype})})
    # check the teacher: the same tokenizer, every id in its output layer, the run's longest row in its context
    student_tokenizer = load_tokenizer(student)
    differences = tokenizer_differences(student_tokenizer, load_tokenizer(teacher_config))
    if differences:
        raise TeachError(
            f"the teacher {config.teach.teacher} does not share the student's tokenizer, so it cannot score the run's token ids: "
            + "; ".join(differences) + ". Choose a teacher of the student's model family (same tokenizer)"
        )
    vocabulary = padded_vocabulary_note(len(student_tokenizer), _output_rows(config.model.path), _output_rows(student.model.path))
    if vocabulary:
        say(f"note: {vocabulary}")
    _check_context(run_dir, teacher_config)

    # prepare RUN/teacher (resumes the same pass; another teacher or K is refused unless --overwrite)
    store.check_foreign(config.teach.overwrite)
    top_k = config.teach.top_k
    teach_settings = {"teach": {"top_k": top_k}, "run": {"config_hash": run_manifest.config_hash}}
    if dtype != "auto":  # a pass resumed in another dtype would mix precisions: refused like other settings
        teach_settings["model"] = {"dtype": dtype}
    identity = {"teacher": model_identity(config.model.path), "dataset": data_identity, "rows": len(dataset)}
    _refuse_another_teacher(store, identity, top_k, config.teach.overwrite, label)
    resumed = store.prepare(teach_settings, identity, config.teach.overwrite)
    shards = plan_shards(len(dataset), student.batching.shard_size)
    pending = store.pending(shards, say)
    # the run's template and columns in the config (a run scored before srdata resolved its config recorded them apart)
    teacher_config = resolved_config(teacher_config, mapping, template)
    on_ray = config.engine.name == "ray"
    manifest = Manifest(
        srdata_version=__version__, status="running", config=teacher_config.model_dump(), settings=teach_settings,
        config_hash=settings_hash({"settings": teach_settings, "identity": identity}), identity=identity,
        backend=BACKEND_ON_REPLICAS if on_ray else select_backend(config.model.backend),  # Ray: as the replicas report
        columns=mapping.to_dict(), resumed=resumed,
        shards=[ShardRecord(index=s.index, file=s.file, start=s.start, stop=s.stop, done=s not in pending) for s in shards],
    )
    manifest.precision = {"dtype": dtype, "requested": requested, "reason": dtype_reason}
    # a resume computes as the call that scored the finished shards did: refused here (local) or per replica (Ray)
    scored_by = earlier_records(store.previous_manifest) if resumed and len(pending) < len(shards) else []
    problem = None if on_ray else resume_mismatch({"replica": None, "backend": manifest.backend, "dtype": dtype}, scored_by)
    if problem:
        raise TeachError(problem)
    if on_ray and any(r.get("replica") is not None for r in scored_by):
        manifest.replicas = scored_by  # kept: they scored the finished shards
        manifest.backend = scored_by[0].get("backend", BACKEND_ON_REPLICAS)
    for entry in manifest.shards:  # keep the finished shards' checksums
        earlier = store.records.get(entry.file)
        if entry.done and earlier is not None:
            entry.sha256, entry.bytes, entry.rows = earlier.sha256, earlier.bytes, earlier.rows
    store.write_manifest(manifest)
    say(f"teacher {config.teach.teacher}: teacher_ce_loss" + (f" and the top-{top_k} log-probs" if top_k else "")
        + f" for {len(dataset)} rows" + (f" (resuming: {len(shards) - len(pending)} of {len(shards)} shards done)" if resumed else ""))

    # teacher scores, shard by shard (this process or Ray actors), each shard written as it finishes
    def save_shard(shard: Shard, frame: pl.DataFrame, seconds: float) -> None:
        written = store.write_shard(shard, frame)
        entry = manifest.shards[shard.index]
        entry.done, entry.sha256, entry.bytes, entry.rows = True, written["sha256"], written["bytes"], written["rows"]
        store.write_manifest(manifest)

    if pending:
        job = ShardJob(dataset, teacher_config, student_tokenizer, open_student=functools.partial(LoadedTeacher, top_k=top_k),
                       model_identity=identity["teacher"], earlier_replicas=scored_by,
                       on_replica=functools.partial(record_replica, manifest, write=store.write_manifest))
        run_shards(config.engine.name, job, pending, save_shard, progress=progress)

    # join into the run's annotated table, checked row by row against the scoring run's token counts
    taught = store.read_shards(manifest.shards, columns=["srd_id", "teacher_ce_loss", "prompt_tokens", "reference_tokens"])
    annotated_path = run_dir / ANNOTATED_FILE
    annotated = _join(pl.read_parquet(annotated_path), taught, label)
    run_store.write_annotated(annotated, metadata=_ranking_metadata_of(annotated_path))
    manifest.status = "complete"
    manifest.counts = {"rows_taught": int(taught["teacher_ce_loss"].is_not_null().sum()), "rows_input": len(dataset)}
    manifest.timings = {"total_seconds": round(time.perf_counter() - started, 3)}
    store.write_manifest(manifest)
    record = {"model": identity["teacher"], "top_k": top_k, "folder": TEACHER_FOLDER, "vocabulary": vocabulary}
    run_store.write_manifest(Manifest.model_validate({**run_manifest.to_json(), "teacher": record}))  # the commit, last
    say(f"wrote teacher_ce_loss and excess_ce_loss into {label}/{ANNOTATED_FILE}" + (f"; top-{top_k} log-probs in {store.output}/shards" if top_k else ""))
    return TeachResult(label, store.output, manifest.to_json())


# ---------------------------------------------------------------------------- helpers
def _as_teach_config(config: TeachConfig | dict[str, Any] | None, settings: dict[str, Any]) -> TeachConfig:
    if isinstance(config, TeachConfig):
        if not settings:
            return config
        config = config.model_dump()
    return TeachConfig.model_validate(merge(nest(config or {}, TEACH_SECTIONS), nest(settings, TEACH_SECTIONS)))


def _output_rows(model: str) -> int:
    """Rows of a model's output layer, from its config (``vocab_size``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def _check_context(run_dir: Path, config: ScoreConfig) -> None:
    """The run's longest prompt + reference must fit the teacher's positions."""
    positions = model_max_positions(config.model.path, config.model.max_model_len)
    if positions is None:
        return
    longest = pl.scan_parquet(run_dir / ANNOTATED_FILE).select((pl.col("prompt_tokens") + pl.col("reference_tokens")).max()).collect().item()
    if longest is not None and longest > positions:
        raise TeachError(
            f"the teacher {config.model.path} has {positions} positions, but the run's longest prompt + reference holds {longest} tokens; "
            "use a teacher with a longer context, or score the run with lower --max-prompt-tokens / --max-reference-tokens"
        )


def _refuse_another_teacher(store: RunStore, identity: dict[str, Any], top_k: int, overwrite: bool, label: Path | str) -> None:
    """Two teachers' passes never mix: a pass of another teacher (or K) is replaced only with --overwrite."""
    previous = read_manifest(store.dir)
    if previous is None or overwrite:
        return
    before = previous.identity.get("teacher", {})
    if before != identity["teacher"]:
        raise TeachError(
            f"{label} already holds the teach pass of {before.get('name')} (fingerprint {before.get('fingerprint')}); "
            f"pass --overwrite to replace it with {identity['teacher'].get('name')}"
        )
    if previous.settings.get("teach", {}).get("top_k") != top_k:
        raise TeachError(
            f"{label} holds a teach pass with --top-k {previous.settings.get('teach', {}).get('top_k')}; "
            f"run it again with that value to resume, or pass --overwrite to redo it with --top-k {top_k}"
        )


def _join(annotated: pl.DataFrame, taught: pl.DataFrame, run_dir: Path | str) -> pl.DataFrame:
    """The run's rows with the teacher columns (replacing earlier ones); refuses rows encoded otherwise."""
    both = annotated.select("srd_id", "prompt_tokens", "reference_tokens").join(taught, on="srd_id", how="inner", suffix="_teacher")
    differ = both.filter(
        (pl.col("prompt_tokens") != pl.col("prompt_tokens_teacher")) | (pl.col("reference_tokens") != pl.col("reference_tokens_teacher"))
    )
    if differ.height:
        row = differ.row(0, named=True)
        raise TeachError(
            f"row srd_id={row['srd_id']}: the teacher pass encoded {row['prompt_tokens_teacher']} + {row['reference_tokens_teacher']} "
            f"tokens where {run_dir} scored {row['prompt_tokens']} + {row['reference_tokens']} ({differ.height} rows differ): the "
            "tokenizer or srdata changed since the run was scored; score the run again"
        )
    kept = annotated.drop([c for c in TEACHER_COLUMNS if c in annotated.columns])
    return kept.join(taught.select("srd_id", "teacher_ce_loss"), on="srd_id", how="left").with_columns(
        (pl.col("ce_loss") - pl.col("teacher_ce_loss")).alias("excess_ce_loss")
    )


class LoadedTeacher:
    """The teacher loaded once, scoring whole shards of the run's encoded pairs: what every engine calls.

    Example:
        >>> teacher = LoadedTeacher(config, tokenizer, top_k=64)   # doctest: +SKIP
        >>> frame = teacher(rows, Shard(0, 0, 100))                                  # doctest: +SKIP
    """

    def __init__(self, config: ScoreConfig, tokenizer: Any = None, *, top_k: int = 0) -> None:
        self.config, self.top_k = config, top_k
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)
        self.backend = load_backend(config, tokenizer=self.tokenizer)

    def __call__(self, rows: dict[str, list], shard: Shard, progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
        rendered, valid, pairs = encode_shard(rows, shard, self.tokenizer, self.config)
        prompts, references = [p.prompt_ids for p in pairs], [p.reference_ids for p in pairs]
        scores = self.backend.score_top_k(prompts, references, self.top_k, progress) if pairs else []
        invalid = [shard.start + i for i in range(len(rendered)) if i not in set(valid)]
        return teacher_frame([shard.start + i for i in valid], prompts, references, scores, self.top_k, invalid)

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()


def _ranking_metadata_of(path: Path) -> dict[str, str] | None:
    """The ``srdata.ranking`` key-value pair of a parquet file (kept when the teacher pass rewrites it), or None."""
    import pyarrow.parquet as pq

    from srdata.curriculum.ranking_record import METADATA_KEY

    value = (pq.read_metadata(path).metadata or {}).get(METADATA_KEY.encode())
    return None if value is None else {METADATA_KEY: value.decode()}
