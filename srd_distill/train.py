"""The SRD stage-2 training loop: distil a teacher into a student, one curriculum stage at a time.

Read top to bottom, as nanoGPT's ``train.py``: :func:`train` (plan, checks, run folder,
teacher, the stages in order), then :func:`train_stage`, the loop itself. The settings are
one pydantic model, :class:`~srd_distill.settings.TrainSettings` (the CLI is generated from it). No
trainer framework and no callbacks: everything that happens in a step is written out there.
Elsewhere: reading data (:mod:`~srd_distill.data`), checks (:mod:`~srd_distill.checks`), the
run folder (:mod:`~srd_distill.run_folder`) and its records (:mod:`~srd_distill.records`), the stages to
train (:mod:`~srd_distill.stages`), the loss and evaluation (:mod:`~srd_distill.objective`), the optimizer
step (:mod:`~srd_distill.step`).

What a run does (``docs/SRD-METHOD.md``, Stage 2):

* **Curriculum** (``curriculum=OUT``): stage ``s`` of the schedule trains on
  ``OUT/stage-s.parquet`` (cumulative, easy to hard, as ``srdata export`` writes it) for
  the stage's epochs, with its ``kd_ratio`` and KD temperature. Stage 0 starts from the
  student; stage ``s > 0`` starts from the saved checkpoint of stage ``s - 1``, with a
  fresh AdamW and a fresh cosine learning-rate schedule.
* **Baseline** (``data=FILE``): one stage on the full data for ``epochs`` epochs (20 by
  default, the method's full-data KD baseline) with the same loss and optimizer;
  ``kd_ratio`` and ``temperature`` default to the first stage of the schedule.
* **Loss** per step: ``(1 - kd_ratio) * CE(student, reference) + kd_ratio * D_T(teacher ||
  student)``, both means over the response tokens of the batch (end-of-sequence included).
* **Tokens**: prompt and reference are encoded by the rules ``srdata score`` used, with the
  prompt settings of the source run's ``manifest.json``, then cut to ``max_length`` tokens.
* **Cached teacher** (``teacher_logits=RUN`` instead of ``teacher``): no teacher is loaded;
  ``D_T`` is computed from the teacher's top-K log-probs that ``srdata teach RUN --top-k K``
  stored, on K + 1 buckets (the K ids and the tail, :mod:`~srd_distill.sparse_kd`). Every
  training row is checked against the cache before any work (its ids' digest, K, the run it
  was made for: :mod:`~srd_distill.teacher_logits`); the cache is an input of the run like the
  teacher (a resume on a changed cache is refused). The eval file then gets the student's CE
  and ROUGE-L only.

Outputs in the run folder ``RUN``: ``RUN/stage-N/`` (the student after stage N, the epoch
with the best eval ROUGE-L when an eval file is given, else the last), ``RUN/metrics.jsonl``
(one JSON object per logged step, ``"event": "train"``, and per evaluation, ``"event":
"eval"``) and ``RUN/run.json`` (settings, input fingerprints, schedule, encoding, finished
stages). Rerunning the same command resumes after the last finished stage, from the next
stage's latest step checkpoint (every ``checkpoint_interval`` steps) when there is one;
``overwrite=True`` starts over. One process at a time writes a run folder; inputs are
identified by content and checkpoints verified by checksum before use
(:mod:`~srd_distill.run_folder` states the guarantees).

Example:
    >>> from srd_distill.train import train
    >>> result = train(teacher="gpt2-xl-sft", student="gpt2", curriculum="runs/dolly/curriculum",
    ...                output="runs/kd-gpt2", loss="rkl", schedule="paper-gpt2")   # doctest: +SKIP
    >>> result.stages[-1].checkpoint                                            # doctest: +SKIP
    PosixPath('runs/kd-gpt2/stage-2')
"""

from __future__ import annotations

import importlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from srd_distill.checks import check_context, shared_tokenizer, student_tokenizer
from srd_distill.data import EncodedData, EncodingSettings, collate, encode_file, find_encoding_settings, read_pairs, split_rows
from srd_distill.errors import TrainingInterrupted, TrainingSetupError
from srd_distill.fused_head import HeadPlan, plan_lm_head
from srd_distill.losses import t2_factor
from srd_distill.memory import (DTYPES, autocast_context, enable_gradient_checkpointing, keep_freed_memory, load_model,
                                micro_batch_count, peak_memory_text, resolve_precision, resolve_teacher_dtype, save_checkpoint,
                                saved_dtype, weight_cast_scope)
from srd_distill.objective import LossSpec, batch_objective, evaluate
from srd_distill.divergences import CROSS_ENTROPY_FORMS, teacher_entropy_meter
from srd_distill.progress import StageProgress, interrupted_message, stage_banner, stage_done, stage_notes, stage_preparing
from srd_distill.checkpoints import verify_checkpoint
from srd_distill.inputs import input_fingerprints
from srd_distill.resume import StagePosition, restore_step, save_step_checkpoint
from srd_distill.remote import train_with_storage, uses_remote_storage
from srd_distill.records import PlannedStage, RunRecord, ScheduleRecord, StageRecord
from srd_distill.run_folder import (METRICS_FILE, RUN_FILE, MetricsLog, check_output_folder, finish_stage, package_versions,
                                    partial_folder, prepare_run_folder, read_run_record, read_stage_record, recorded_settings,
                                    stage_folder, step_folders, steps_done, utc_now, write_run_record)
from srdata.backends.dtype import resolve_dtype_with_reason
from srdata.run.identity import UnsafeWeightsError, require_safetensors
from srdata.run.io import FolderLock, remove_stale_temps, verify_file
from srd_distill.settings import TrainSettings, build_settings, setting_defaults
from srd_distill.stages import StageResult, TrainingStage, TrainResult, plan_training
from srd_distill.step import learning_rate, make_optimizer, optimizer_step
from srd_distill.teacher_logits import TeacherLogits, cached_teacher_for

__all__ = ["train", "train_stage", "RunContext", "TrainSettings", "TrainResult", "StageResult"]

log = logging.getLogger(__name__)

# --- The run: plan, check, open the run folder, load the teacher, train the stages in order -------


def train(
    settings: TrainSettings | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` over the curriculum stages (or the full data).

    Settings are a :class:`TrainSettings`, a dict, keyword arguments named like its
    fields, or a mix (keywords win). See the module docstring for what is written where.

    Example:
        >>> train(teacher="./teacher", student="./student", curriculum="runs/a/curriculum",
        ...       output="runs/kd", schedule="paper-gpt2", epochs=2, eval_file="dev.jsonl")  # doctest: +SKIP
    """
    say = echo or log.info
    s = build_settings(settings, **overrides)
    if uses_remote_storage(s):  # s3://... (or file://) paths: trained on local copies, published (srd_distill.remote)
        return train_with_storage(train, s, progress=progress, echo=echo)
    run_dir = Path(s.output)
    check_output_folder(run_dir, overwrite=s.overwrite)  # a file, a foreign folder: refused before anything is written

    # 1. Plan: stages, files, encoding. Everything that can fail without a model fails here.
    plans, schedule = plan_training(s.schedule, curriculum=s.curriculum, epochs=s.epochs, data=s.data,
                                  kd_ratio=s.kd_ratio, temperature=s.temperature)
    encoding = find_encoding_settings(s.curriculum if s.curriculum is not None else s.data,  # type: ignore[arg-type]
                                      echo=say if s.teacher_logits is None else lambda _: None)
    if s.teacher_logits is not None and encoding.source == "srdata defaults":  # data without its manifest: the cache's run encodes
        encoding = find_encoding_settings(Path(s.teacher_logits) / "manifest.json", echo=say)
    if s.eval_file is not None and not Path(s.eval_file).is_file():
        raise TrainingSetupError(f"eval file {s.eval_file} does not exist")
    device, dtype = resolve_precision(s.device, s.dtype)
    dtype_reason = resolve_dtype_with_reason(s.dtype, device)[1]  # auto: bfloat16 on GPUs and CPUs with AMX or AVX512-BF16
    for role, model in (("teacher", s.teacher), ("student", s.student)):
        if model is None:  # --teacher-logits: no teacher model
            continue
        try:
            require_safetensors(model)  # pickle weights can run code when loaded: refused, with how to convert
        except UnsafeWeightsError as err:
            raise TrainingSetupError(f"the {role}: {err}") from None

    # 2. One tokenizer for both models, checked; or the student's and the teacher's cached top-K, every row aligned.
    cached: Optional[TeacherLogits] = None
    if s.teacher is not None:
        probe = read_pairs(plans[0].data_file)[0].head(16)
        tokenizer, vocab_size = shared_tokenizer(s.teacher, s.student, probe["prompt_text"].to_list() + probe["reference_text"].to_list())
        teacher_dtype, teacher_dtype_reason = resolve_teacher_dtype(s.teacher_dtype, saved_dtype(s.teacher), device, dtype)
    else:
        tokenizer, vocab_size = student_tokenizer(s.student)
        teacher_dtype, teacher_dtype_reason = None, "no teacher model"
        cached = cached_teacher_for([p.data_file for p in plans], s.teacher_logits, s.teacher_top_k,  # type: ignore[arg-type]
                                    tokenizer, encoding, s.max_length, vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # masked anyway
    save_dtype = DTYPES[s.save_dtype] if s.save_dtype != "auto" else saved_dtype(s.student)
    eval_data = encode_file(s.eval_file, tokenizer, encoding, s.max_length)[0] if s.eval_file is not None else None
    # What the run trains on, by content (run.json records it; a resume on other inputs is refused).
    inputs = input_fingerprints(s.flat(), [(p.index, p.data_file, p.sha256) for p in plans], encoding.describe(),
                                cached.fingerprint if cached is not None else None)
    if "data" in inputs:
        plans = [replace(plans[0], sha256=inputs["data"]["sha256"])]

    # 3. The run folder, ours alone from here to the end: resume what is finished, refuse what does not match.
    with FolderLock(run_dir, "srd-distill train"):
        remove_stale_temps(run_dir)
        dtype_names = {name: None if value is None else str(value).removeprefix("torch.") for name, value in
                       (("dtype", dtype), ("teacher_dtype", teacher_dtype), ("save_dtype", save_dtype))}
        run_record = RunRecord(
            mode="curriculum" if s.curriculum is not None else "baseline",
            settings=recorded_settings(s.flat()),
            inputs=inputs,
            schedule=ScheduleRecord(name=schedule.name, stages=[
                PlannedStage(stage=p.index, file=str(p.data_file), epochs=p.epochs, kd_ratio=p.kd_ratio, temperature=p.temperature)
                for p in plans
            ]),
            encoding=encoding.describe(),
            tokenizer={"class": type(tokenizer).__name__, "vocab_size": vocab_size, "eos_token": tokenizer.eos_token},
            device=str(device),
            **dtype_names,
            dtype_reason=dtype_reason,
            versions=package_versions(),
        )
        defaults = setting_defaults()
        point = prepare_run_folder(run_dir, run_record.settings, inputs, len(plans), overwrite=s.overwrite,
                                   defaults=defaults, echo=say)
        finished = point.finished
        previous = read_run_record(run_dir)
        run_record.created_at = previous.created_at if previous is not None and previous.created_at else utc_now()
        # From the (verified) stage folders themselves: a kill between a stage's rename and the
        # run.json that lists it must not lose its record.
        run_record.stages_finished = [read_stage_record(run_dir, stage) for stage in sorted(finished)]
        write_run_record(run_dir, run_record, "running")

        # 4. The teacher, once and frozen (not at all when every stage is done); the student
        # is loaded per stage, from the previous stage's checkpoint.
        teacher, teacher_head = None, None
        if cached is not None:
            say(f"no teacher model: KD from the top-{cached.top_k} log-probs of {cached.teacher} cached in "
                f"{cached.run}/teacher ({len(cached.ids)} positions of {len(cached.srd_ids)} rows in memory)")
        elif len(finished) < len(plans):
            say(f"loading the teacher from {s.teacher} ...")
            teacher = load_model(s.teacher, device, teacher_dtype, "teacher")
            teacher.eval()
            teacher.requires_grad_(False)
            say(f"teacher in {dtype_names['teacher_dtype']} ({teacher_dtype_reason}); student weights in float32, "
                f"compute in {dtype_names['dtype']} ({dtype_reason}), checkpoints in {dtype_names['save_dtype']}")
            teacher_head = plan_lm_head(teacher, vocab_size, "teacher") if s.fused_head else None
        next_stage = min(set(range(len(plans))) - finished, default=-1)  # its lines before its step checkpoint are kept
        metrics = MetricsLog(run_dir / METRICS_FILE, point.elapsed, lines={next_stage: point.metrics_lines})
        ctx = RunContext(s, run_dir, teacher, tokenizer, vocab_size, pad_id, device, dtype, encoding, eval_data, metrics, progress, say,
                         len(plans), teacher_head, save_dtype, global_step=steps_done(run_record.stages_finished),
                         resume_from=point.step_checkpoint, teacher_logits=cached)

        # 5. The stages, in order.
        results: list[StageResult] = []
        status = "complete"
        current: Optional[int] = None  # the stage being trained
        try:
            for plan in plans:
                if plan.index in finished:
                    results.append(StageResult.of_finished(run_dir, plan.index))
                    continue
                if s.stop_after_stage is not None and plan.index > s.stop_after_stage:
                    status = "stopped"
                    say(f"stopping before stage {plan.index} as asked (stop_after_stage={s.stop_after_stage}); rerun without it to continue")
                    break
                start_from = s.student if plan.index == 0 else stage_folder(run_dir, plan.index - 1)
                if plan.index > 0 and plan.index - 1 not in finished:  # stages finished before were verified on resume
                    verify_checkpoint(stage_folder(run_dir, plan.index - 1), fix=f"move {start_from} away and run the same "
                                      f"command again to retrain stage {plan.index - 1}, or pass --overwrite to start over")
                current = plan.index
                results.append(train_stage(ctx, plan, start_from))
                current = None
                run_record.stages_finished.append(results[-1].record)
                write_run_record(run_dir, run_record, "running")
        except KeyboardInterrupt as interrupt:
            write_run_record(run_dir, run_record, "interrupted")
            saved = step_folders(run_dir, current) if current is not None else []  # what a rerun will resume from
            raise TrainingInterrupted(interrupted_message(run_dir, [r.stage for r in results], current,
                                                          saved[-1][1] if saved else 0)) from interrupt
        finally:
            metrics.close()
        write_run_record(run_dir, run_record, status)
    return TrainResult(run_dir, results, run_dir / METRICS_FILE, run_dir / RUN_FILE, status == "complete")


# --- One stage: the training loop -----------------------------------------------------------------


def train_stage(ctx: RunContext, plan: TrainingStage, start_from: str | Path) -> StageResult:
    """Train one stage from ``start_from`` (or from ``ctx.resume_from``, its step checkpoint), save ``RUN/stage-N``
    atomically, and return its record (``srd_stage.json``) and checkpoint.

    Example:
        >>> train_stage(ctx, TrainingStage(0, Path("stage-0.parquet"), 8, 0.8, 1.0), "./student").record.kept_epoch  # doctest: +SKIP
        7
    """
    s, teacher, cached = ctx.settings, ctx.teacher, ctx.teacher_logits
    assert teacher is not None or cached is not None, "train() loads the teacher whenever a stage is left to train"
    started = time.perf_counter()
    torch.manual_seed(s.seed + plan.index)  # stage s uses seed + s: a resumed stage repeats exactly
    shuffle = torch.Generator().manual_seed(s.seed + plan.index)

    ctx.echo(stage_preparing(plan.index, ctx.n_stages, plan.data_file.name, ctx.resume_from or start_from))
    if plan.sha256 is not None:  # the file may have changed since the run was planned (a stage starts hours later)
        verify_file(plan.data_file, plan.sha256, fix=f"it changed while the run went on; restore it, or pass --overwrite to start over")
    data, flagged = encode_file(plan.data_file, ctx.tokenizer, ctx.encoding, s.max_length, srd_ids=cached is not None)
    if cached is not None:  # each row checked against the cache again (cheap), each example pointing at its top-K
        data = cached.align(data, plan.data_file)
    keep_freed_memory(ctx.device)  # CPU: a step's large temporaries reuse freed pages (no page faults)
    student = load_model(start_from, ctx.device, torch.float32, "student")  # float32 master weights
    check_context(student, teacher, max(len(e.input_ids) for e in data.examples))
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    student_head = plan_lm_head(student, ctx.vocab_size, "student") if s.fused_head else None
    optimizer = make_optimizer(student, s.lr, s.weight_decay, ctx.device, ctx.dtype)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)  # a no-op unless float16
    precision = autocast_context(ctx.device, ctx.dtype)
    spec = LossSpec(s.loss, plan.temperature, plan.kd_ratio, s.t2_scaling, ctx.vocab_size, student_head, ctx.teacher_head,
                    sparse=cached is not None)
    factor = t2_factor(s.loss, plan.temperature, s.t2_scaling)

    n_rows = len(data.examples)
    epoch_steps = plan.epochs * math.ceil(n_rows / s.batch_size)
    total_steps = min(epoch_steps, s.max_steps or math.inf)
    true_kl = s.loss in CROSS_ENTROPY_FORMS  # fkl, sfkl: log value - H(teacher) too, which reads 0 at agreement
    partial = partial_folder(ctx.run_dir, plan.index)
    at = StagePosition(global_step=ctx.global_step, total_steps=total_steps, rows=n_rows)
    resumed = ctx.resume_from is not None
    if resumed:  # continue where the step checkpoint left: weights, AdamW, RNG, data position
        at = restore_step(ctx.resume_from, student=student, optimizer=optimizer, scaler=scaler, shuffle=shuffle,
                          partial=partial, expected=at)
        ctx.resume_from, ctx.global_step = None, at.global_step
    notes = stage_notes(flagged=flagged, dropped=data.dropped_rows, loss_source=spec.source,
                        gradient_checkpointing=s.gradient_checkpointing)
    ctx.echo(stage_banner(plan.index, ctx.n_stages, rows=n_rows, file_name=plan.data_file.name, epochs=plan.epochs, steps=total_steps,
                          kd_ratio=plan.kd_ratio, temperature=plan.temperature, t2_factor=factor,
                          notes=notes + [f"resumed after step {at.step}"] * resumed, epoch_steps=epoch_steps))
    stage_keys = {"stage": plan.index, "temperature": plan.temperature, "kd_ratio": plan.kd_ratio, "t2_factor": factor}
    bar = StageProgress(plan.index, ctx.n_stages, total_steps=total_steps, t2_factor=factor, enabled=ctx.progress, initial=at.step)

    for epoch in range(at.epoch, plan.epochs):
        if at.step >= total_steps:
            break
        if not (resumed and epoch == at.epoch):  # a resumed epoch keeps its order and goes on from its next batch
            at.epoch, at.next_batch = epoch, 0
            at.order = torch.randperm(n_rows, generator=shuffle).tolist()  # shuffled within the stage
        while at.next_batch < n_rows and at.step < total_steps:
            # One optimizer step over batch_size rows, in grad_accum micro-batches or more
            # (each at most micro_batch_tokens padded tokens). Each micro-batch's token-mean
            # loss is weighted by its share of the step's scored tokens, so the gradient is
            # that of the token mean over the whole step.
            rows = at.order[at.next_batch : at.next_batch + s.batch_size]
            at.next_batch += s.batch_size
            step_tokens = sum(data.examples[i].scored_tokens for i in rows)
            means = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "entropy": 0.0}  # this step's token means
            width = max(len(data.examples[i].input_ids) for i in rows)
            with weight_cast_scope(ctx.device, ctx.dtype):  # half weight copies made once per step, left before the update
                for micro_rows in split_rows(rows, max(s.grad_accum, micro_batch_count(len(rows), width, s.micro_batch_tokens))):
                    batch = collate([data.examples[i] for i in micro_rows], ctx.pad_id, ctx.device, top_k=cached)
                    with teacher_entropy_meter() as entropy:
                        out = batch_objective(student, teacher, batch, spec, precision)
                    share = batch.scored_tokens / step_tokens
                    means["entropy"] += entropy.mean * share
                    scaler.scale(out.loss * share).backward()
                    for key, value in zip(("loss", "ce_loss", "kd_loss"), out):
                        means[key] += float(value.detach()) * share
            at.lr = learning_rate(at.step, total_steps, s.lr, s.warmup_steps)
            grad_norm = optimizer_step(optimizer, lr=at.lr, grad_clip=s.grad_clip, scaler=scaler)
            at.step += 1
            ctx.global_step += 1
            at.global_step, at.last_epoch = ctx.global_step, epoch
            for key, value in means.items():
                at.window[key] = at.window.get(key, 0.0) + value * step_tokens
            at.window["tokens"] += step_tokens
            entropy_mean = means.pop("entropy")
            bar.step(**means, kd_unscaled=means["kd_loss"] / factor, tokens=sum(len(data.examples[i].input_ids) for i in rows),
                     kd_kl=means["kd_loss"] / factor - entropy_mean if true_kl else None)

            if at.step % s.log_every == 0 or at.step == total_steps:
                n = max(at.window["tokens"], 1)
                ctx.metrics.write({
                    "event": "train", **stage_keys, "epoch": epoch, "step": at.step, "global_step": ctx.global_step,
                    "loss": at.window["loss"] / n, "kd_loss": at.window["kd_loss"] / n, "ce_loss": at.window["ce_loss"] / n,
                    "kd_unscaled": at.window["kd_loss"] / n / factor, "lr": at.lr, "grad_norm": grad_norm, "tokens": at.window["tokens"],
                    # The true KL of a cross-entropy-form loss: 0 when student = teacher (kd_unscaled is then H(teacher)).
                    "kd_kl": (at.window["kd_loss"] / factor - at.window.get("entropy", 0.0)) / n if true_kl else None,
                })
                at.window = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "entropy": 0.0, "tokens": 0}
            if s.checkpoint_interval and at.step % s.checkpoint_interval == 0 and at.step < total_steps:
                at.seconds += time.perf_counter() - started
                started = time.perf_counter()
                save_step_checkpoint(ctx.run_dir, plan.index, at, student=student, optimizer=optimizer, scaler=scaler, shuffle=shuffle,
                                     metrics_lines=ctx.metrics.lines.get(plan.index, 0), partial=partial)
        resumed = False

        # End of an epoch (or of the step budget): evaluate and keep the best weights.
        if ctx.eval_data is not None:
            scores = evaluate(
                student, teacher, ctx.tokenizer, ctx.eval_data, spec,
                batch_size=s.batch_size, max_new_tokens=s.eval_max_new_tokens,
                rouge_tokenizer=ctx.encoding.rouge_tokenizer, pad_id=ctx.pad_id, device=ctx.device, precision=precision,
            )
            improved = at.best_rouge is None or scores["eval_rouge_l"] > at.best_rouge
            ctx.metrics.write({
                "event": "eval", **stage_keys, "epoch": epoch, "step": at.step, "global_step": ctx.global_step,
                **scores, "kd_unscaled": None if scores["kd_loss"] is None else scores["kd_loss"] / factor, "lr": at.lr,
                "best": improved,
            })
            loss_text = f"eval loss {scores['loss']:.4f}" if scores["loss"] is not None else f"eval CE {scores['ce_loss']:.4f}"
            bar.write(f"stage {plan.index} epoch {epoch}: eval ROUGE-L {scores['eval_rouge_l']:.4f}, "
                      f"{loss_text}" + (" (best so far)" if improved else ""), ctx.echo)
            if improved:
                at.best_rouge, at.kept_epoch = scores["eval_rouge_l"], epoch
                save_checkpoint(student, ctx.tokenizer, partial, dtype=ctx.save_dtype)
    bar.close()

    if ctx.eval_data is None:  # no eval file: keep the last weights
        at.kept_epoch = at.last_epoch
        save_checkpoint(student, ctx.tokenizer, partial, dtype=ctx.save_dtype)
    seconds = round(at.seconds + time.perf_counter() - started, 3)
    record = StageRecord(
        stage=plan.index, data_file=str(plan.data_file), rows=n_rows, flagged_rows_left_out=flagged,
        rows_without_reference_room=data.dropped_rows, rows_cut_to_max_length=data.cut_rows,
        epochs=plan.epochs, steps=at.step, kd_ratio=plan.kd_ratio, temperature=plan.temperature,
        loss=s.loss, t2_scaling=s.t2_scaling, started_from=str(start_from), kept_epoch=at.kept_epoch,
        best_eval_rouge_l=at.best_rouge, seconds=seconds, fused_head=spec.fused,
    )
    checkpoint = finish_stage(ctx.run_dir, plan.index, record)
    ctx.echo(stage_done(plan.index, at.step, seconds, checkpoint, peak_memory_text(ctx.device)))
    del student, optimizer
    return StageResult(record, checkpoint)


# --- What every stage shares ----------------------------------------------------------------------


@dataclass
class RunContext:
    """What every stage shares: settings, models' common pieces, files, logging."""

    settings: TrainSettings
    run_dir: Path
    teacher: Optional[torch.nn.Module]  # None only when no stage is left to train
    tokenizer: Any
    vocab_size: int
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    encoding: EncodingSettings
    eval_data: Optional[EncodedData]
    metrics: MetricsLog
    progress: bool
    echo: Callable[[str], None]
    n_stages: int = 1
    teacher_head: Optional[HeadPlan] = None  # None: the fused head is off (--no-fused-head)
    save_dtype: Optional[torch.dtype] = None  # checkpoints are written in it (the student's saved dtype)
    global_step: int = 0
    resume_from: Optional[Path] = None  # the verified step checkpoint the first stage to train continues from
    teacher_logits: Optional[TeacherLogits] = None  # --teacher-logits: the cached top-K instead of a teacher model


# --- Old imports ------------------------------------------------------------------------------------

# Names this module re-exported (without using them) before they lived in their own modules: still
# importable from here, with a DeprecationWarning naming where they are.
_MOVED = {
    "Example": "srd_distill.data", "encode_data": "srd_distill.data", "curriculum_stage_files": "srd_distill.data",
    "CurriculumFilesError": "srd_distill.errors", "RunFolderError": "srd_distill.errors",
    "TokenizerMismatchError": "srd_distill.errors", "check_same_tokenizer": "srd_distill.checks",
    "BASELINE_EPOCHS": "srd_distill.stages",
}
_RENAMED = {"StagePlan": ("srd_distill.stages", "TrainingStage"), "plan_stages": ("srd_distill.stages", "plan_training")}


def __getattr__(name: str) -> Any:
    if name in _MOVED or name in _RENAMED:
        module, new = _RENAMED.get(name, (_MOVED.get(name), name))
        warnings.warn(f"importing {name} from srd_distill.train is deprecated; use {module}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), new)  # type: ignore[arg-type]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
