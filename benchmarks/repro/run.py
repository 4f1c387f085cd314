"""End-to-end SRD reproduction on a laptop: SRD vs full-data KD on a controlled testbed.

    python benchmarks/repro/run.py                 # full run: 3 seeds x (fkl, rkl) x 2 arms, <= 30 min on 2 cores
    python benchmarks/repro/run.py --quick         # 1 seed, fkl, small data: <= 3 min (the test runs this)
    python benchmarks/repro/run.py --seeds 0 --losses jsd --out runs/repro-jsd

What it does (every setting is in ``SETTINGS`` below, chosen before any comparison and
identical for both arms):

1. **Testbed** (:mod:`srdata.demo.testbed`): synthetic instruction pairs from four task
   families (copy, reverse, shift, sort) at four difficulty levels; 10% of the
   training pairs get a wrong response (flag ``is_noisy``, used only here for
   evaluation); clean dev (checkpoint choice) and test (final evaluation) sets.
2. **Teacher** (:mod:`srd_distill.testbed_models`): a character-level Llama trained with
   cross-entropy on clean pairs of the same task distribution. **Student** (per seed): a
   smaller Llama given a short warm-up on other clean pairs.
3. **SRD arm**, through the real CLIs: ``srdata score`` (the student answers every training
   prompt) -> ``srdata export --stages 4 --keep 3`` -> ``srd-distill train --curriculum
   --schedule paper-gpt2 --epochs E`` (3 stages, kd_ratio 0.8/0.9/1.0, T 1/1.5/2).
4. **Baseline arm**: ``srd-distill train --data annotated.parquet --epochs 2.5E
   --kd-ratio 1.0 --temperature 1`` on all training pairs (noisy ones included), as the
   reference KD baselines (POCL ``kd_base.sh``); same loss, optimizer, batch, lr, seed and
   dev set. SRD makes E x (0.25 + 0.5 + 0.75) N = 1.5 E N sample passes, 60% of the
   baseline's 2.5 E N: the paper's 12 N vs 20 N, scaled down.
5. **Measure**: greedy test exact match and ROUGE-L per difficulty level, training
   wall-clock and sample passes per arm, the share of noisy pairs in the dropped quarter
   (fused ranking, ROUGE-L alone, cross-entropy alone) and the Spearman agreement of the
   two rankings; mean and spread over seeds.
6. **Stratified SRD arm** (added after the first comparison, which showed SRD's stages
   starving three of the four task families): ``srdata export --stratify task`` (the same
   4 stages keep 3, cut within every task so each keeps its 25% of every stage and of the
   dropped part), then the same ``srd-distill train --curriculum`` as the SRD arm. The
   task shares of both curricula are recorded.

Outputs: ``OUT/results.json``, ``OUT/table.md``, ``OUT/quality_vs_time.png``; the full
mode also writes ``benchmarks/repro/results.json`` and ``benchmarks/repro/quality_vs_time.png``.
Rerunning with the same ``--out`` reuses finished steps (teacher, students, scores,
training runs, evaluations) and their recorded timings; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from srd_distill.testbed_models import TinyModelRecipe, student_recipe, teacher_recipe, evaluate_model, model_parameters, train_teacher, warm_up_student  # noqa: E402
from srdata.run.io import write_json_atomic  # noqa: E402
from srdata.demo.regimes import REGIME_NAMES, regime_settings  # noqa: E402
from srdata.demo.testbed import TestbedSpec, build_testbed, format_ranking_summary, ranking_summary  # noqa: E402

ARMS = ("srd", "baseline")
# Arms added after the first comparison: run after the main arms, reported apart and labelled so.
ADDED_ARMS = ("srd_stratified",)
STRATIFY_COLUMN = "task"
ARM_LABELS = {"srd": "SRD (score -> 4 stages keep 3 -> curriculum KD)", "baseline": "full-data KD",
              "srd_stratified": f"SRD, stages stratified by {STRATIFY_COLUMN} (added after the first comparison)",
              "srd_teachable": "SRD ranked by --rank-by teachable (score + teach -> 4 stages keep 3 -> curriculum KD)",
              "baseline_offline": "full-data KD from the offline teacher logits (srdata teach --top-k, srd-distill --teacher-logits)"}
ARM_NAMES = {"srd": "SRD", "baseline": "full-data KD", "srd_stratified": "SRD stratified by task (added)",
             "srd_teachable": "SRD teachable", "baseline_offline": "full-data KD offline"}
# The pre-registered two-regime comparison (benchmarks/repro/PLAN.md): its arms, in the order of the plan.
DEFAULT_ARMS = ("srd", "baseline", "srd_stratified")
COMPARISON_ARMS = ("srd", "srd_teachable", "baseline", "baseline_offline")
TEACH_ARMS = ("srd_teachable", "baseline_offline")  # arms that need the teacher pass
CURRICULUM_ARMS = ("srd", "srd_stratified", "srd_teachable")


@dataclass(frozen=True)
class Settings:
    """Everything that defines a reproduction run (recorded in results.json)."""

    testbed: TestbedSpec
    teacher: TinyModelRecipe
    student: TinyModelRecipe
    seeds: tuple[int, ...]
    losses: tuple[str, ...]
    srd_epochs_per_stage: int
    baseline_epochs: int
    stages: int = 4
    keep: int = 3
    schedule: str = "paper-gpt2"
    baseline_kd_ratio: float = 1.0  # the reference KD baselines (POCL kd_base.sh: --kd-ratio 1.0, T = 1)
    baseline_temperature: float = 1.0
    lr: float = 1e-3
    batch_size: int = 16
    max_new_tokens: int = 24
    extra_train_flags: tuple[str, ...] = field(default_factory=tuple)
    regime: Optional[str] = None  # srdata.demo.regimes: None = the testbed spec as given (the first comparison)
    arms: tuple[str, ...] = DEFAULT_ARMS
    top_k: int = 32  # the teacher pass's top-K (arms that need it: TEACH_ARMS)

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        if self.regime is None and self.arms == DEFAULT_ARMS:  # the first comparison's record, unchanged
            for key in ("regime", "arms", "top_k"):
                out.pop(key)
        out["sample_pass_ratio"] = self.srd_epochs_per_stage * sum((s + 1) / self.stages for s in range(self.keep)) / self.baseline_epochs
        return out


FULL = Settings(
    testbed=TestbedSpec(train_pairs=2000, dev_pairs=96, test_pairs=640, teacher_pairs=40000, warmup_pairs=8000, noise_fraction=0.10, seed=0),
    teacher=teacher_recipe(steps=1000),  # Llama 4 x 128, 1,000 steps x 64 clean pairs
    student=student_recipe(),  # Llama 2 x 64, 300 warm-up steps x 64 clean pairs
    seeds=(0, 1, 2),
    losses=("fkl", "rkl"),
    srd_epochs_per_stage=4,   # SRD: 4 x (0.25 + 0.5 + 0.75) N = 6 N sample passes
    baseline_epochs=10,       # baseline: 10 N (the paper: 12 N vs 20 N)
)
QUICK = Settings(
    testbed=TestbedSpec(train_pairs=400, dev_pairs=32, test_pairs=160, teacher_pairs=8000, warmup_pairs=4000, noise_fraction=0.10, seed=0),
    teacher=teacher_recipe(hidden_size=96, num_layers=3, steps=200),
    student=student_recipe(steps=150),
    seeds=(0,),
    losses=("fkl",),
    srd_epochs_per_stage=2,
    baseline_epochs=5,
)
# The pre-registered two-regime comparison (PLAN.md): sized so both regimes run in about an
# hour of wall-clock on the 2 shared cores (load average near 10 when it was sized); the
# teacher, student, epochs per stage and optimizer are FULL's, the distillation data is smaller.
REGIMES_FULL = replace(
    FULL, testbed=TestbedSpec(train_pairs=600, dev_pairs=64, test_pairs=448, teacher_pairs=40000, warmup_pairs=8000, noise_fraction=0.10, seed=0),
    arms=COMPARISON_ARMS)
# The quick version of both regimes (tests/test_repro.py): about a minute each on an idle machine.
REGIMES_QUICK = replace(
    QUICK, testbed=TestbedSpec(train_pairs=240, dev_pairs=28, test_pairs=56, teacher_pairs=8000, warmup_pairs=4000, noise_fraction=0.10, seed=0),
    arms=COMPARISON_ARMS)


def with_regime(settings: Settings, regime: str) -> Settings:
    """``settings`` on the testbed of ``regime`` (its task families and reference noise).

    Example:
        >>> with_regime(REGIMES_QUICK, "paper").testbed.noise_fraction
        0.2
    """
    return replace(settings, regime=regime, testbed=replace(settings.testbed, **regime_settings(regime)))


# ======================================================================================
# Helpers: subprocesses with clear errors, cached steps
# ======================================================================================


LAST_CPU_SECONDS = [0.0]
COMMAND_THREADS = 1


class StepFailed(RuntimeError):
    """A command of the pipeline failed; the message holds the command and its output tail."""


def cli(name: str) -> list[str]:
    """The console script ``name`` next to this Python, else ``python -m`` its module."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", {"srdata": "srdata.cli", "srd-distill": "srd_distill.cli"}[name]]


def run_command(args: list[str], log_file: Path, echo: Callable[[str], None]) -> float:
    """Run ``args``, output to ``log_file``; return the wall-clock seconds or raise :class:`StepFailed`.

    The CPU seconds (user + system) the command used are kept in ``LAST_CPU_SECONDS[0]``.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # One intra-op thread per command: on a machine shared with other jobs, CPU seconds are
    # then a stable measure of work (no spinning OpenMP threads), and the tiny models gain
    # little from a second thread anyway.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(COMMAND_THREADS), "MKL_NUM_THREADS": str(COMMAND_THREADS),
           # this checkout's srdata/srd_distill, also when the installed console scripts point at another copy
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    shown = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(args))
    echo(f"    $ {shown}")
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log_file.open("w", encoding="utf-8") as log:
        completed = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU_SECONDS[0] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if completed.returncode != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise StepFailed(f"command failed with exit code {completed.returncode} after {seconds:.0f}s:\n  {' '.join(args)}\n"
                         f"last lines of {log_file}:\n{tail}")
    echo(f"      done in {seconds:.1f}s ({LAST_CPU_SECONDS[0]:.0f} CPU-s)")
    return seconds


def cached(record_file: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]], echo: Callable[[str], None]) -> dict[str, Any]:
    """Reuse ``record_file`` when it was written for the same ``key``; else compute and write it."""
    key = json.loads(json.dumps(key))  # compare as stored: tuples become lists in JSON
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("key") == key:
            echo(f"    reusing {record_file.relative_to(record_file.parents[1]) if len(record_file.parents) > 1 else record_file}")
            return record["value"]
    value = compute()
    write_json_atomic(record_file, {"key": key, "value": value})
    return value


def stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    clean = [v for v in values if v is not None]
    if not clean:
        return {"mean": None, "std": None, "min": None, "max": None, "values": values}
    return {
        "mean": statistics.fmean(clean),
        "std": statistics.stdev(clean) if len(clean) > 1 else 0.0,
        "min": min(clean),
        "max": max(clean),
        "values": values,
    }


# ======================================================================================
# The pipeline
# ======================================================================================


def prepare_models(settings: Settings, out: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """Testbed files and the teacher (shared by every seed)."""
    echo("[1] testbed")
    files = build_testbed(out / "testbed", settings.testbed, regime=settings.regime)
    echo(f"    {files.counts['train']} training pairs ({files.counts['train_noisy']} noisy), dev {files.counts['dev']}, "
         f"test {files.counts['test']}, teacher SFT {files.counts['teacher_sft']}, student warm-up {files.counts['warmup']}")

    echo("[2] teacher (cross-entropy on clean pairs of the task distribution)")
    teacher_dir = out / "teacher"

    def make_teacher() -> dict[str, Any]:
        started = time.perf_counter()
        train_teacher(teacher_dir, files.teacher_sft, settings.teacher, seed=settings.testbed.seed, echo=echo)
        seconds = time.perf_counter() - started
        return {"train_seconds": seconds, "parameters": model_parameters(teacher_dir),
                "test": evaluate_model(teacher_dir, files.test, max_new_tokens=settings.max_new_tokens)}

    teacher = cached(out / "records" / "teacher.json", {"testbed": teacher_data_key(settings), "teacher": settings.teacher.describe()},
                     make_teacher, echo)
    echo(f"    teacher: {teacher['parameters']:,} parameters, test exact match {teacher['test']['overall']['exact_match']:.3f}, "
         f"ROUGE-L {teacher['test']['overall']['rouge_l']:.3f}")
    return {"files": files, "teacher_dir": teacher_dir, "teacher": teacher}


def teacher_data_key(settings: Settings) -> dict[str, Any]:
    """What the teacher's training data depends on (the comparison: its SFT split's size, seed and cells only,
    so a change of the distillation split's size keeps the teacher; the first comparison: the whole spec)."""
    spec = asdict(settings.testbed)
    if settings.regime is None:
        return spec
    return {k: spec[k] for k in ("teacher_pairs", "seed", "tasks", "levels")}


def run_seed(settings: Settings, out: Path, seed: int, shared: dict[str, Any], echo: Callable[[str], None],
             diagnostics: bool = False) -> dict[str, Any]:
    """Student, scoring, export and both arms for every loss, for one seed."""
    files = shared["files"]
    seed_dir = out / f"seed-{seed}"
    records = out / "records"
    base_key = {"testbed": asdict(settings.testbed), "teacher": settings.teacher.describe(), "student": settings.student.describe(), "seed": seed}

    echo(f"[seed {seed}] student warm-up")
    student_dir = seed_dir / "student"

    def make_student() -> dict[str, Any]:
        started = time.perf_counter()
        warm_up_student(student_dir, files.warmup, settings.student, seed=seed, echo=echo)
        return {"warmup_seconds": time.perf_counter() - started, "parameters": model_parameters(student_dir),
                "test": evaluate_model(student_dir, files.test, max_new_tokens=settings.max_new_tokens)}

    student = cached(records / f"seed-{seed}-student.json", base_key, make_student, echo)
    echo(f"    student: {student['parameters']:,} parameters, test exact match {student['test']['overall']['exact_match']:.3f}, "
         f"ROUGE-L {student['test']['overall']['rouge_l']:.3f}")

    echo(f"[seed {seed}] SRD data step: srdata score + srdata export")
    score_dir, curriculum_dir = seed_dir / "score", seed_dir / "curriculum"
    score_key = {**base_key, "max_new_tokens": settings.max_new_tokens, "stages": settings.stages, "keep": settings.keep}

    def make_scores() -> dict[str, Any]:
        score_seconds = run_command(
            cli("srdata") + ["score", str(files.train), "--model", str(student_dir), "--output", str(score_dir),
                             "--template", "raw", "--max-new-tokens", str(settings.max_new_tokens), "--device", "cpu",
                             # the character-level students have 128 positions; testbed rows are short
                             "--max-prompt-tokens", "64", "--max-reference-tokens", "32",
                             "--seed", str(seed), "--overwrite", "--quiet"],
            seed_dir / "logs" / "score.log", echo)
        score_cpu_seconds = LAST_CPU_SECONDS[0]
        export_seconds = run_command(
            cli("srdata") + ["export", str(score_dir), "--stages", str(settings.stages), "--keep", str(settings.keep),
                             "--out", str(curriculum_dir)],
            seed_dir / "logs" / "export.log", echo)
        return {"score_seconds": score_seconds, "score_cpu_seconds": score_cpu_seconds, "export_seconds": export_seconds,
                "ranking": ranking_summary(score_dir / "annotated.parquet", settings.stages, settings.keep)}

    scoring = cached(records / f"seed-{seed}-scores.json", score_key, make_scores, echo)
    ranking = scoring["ranking"]
    fused = ranking["by_ranking"]["difficulty_rank"]
    echo(f"    noisy pairs in the dropped quarter: fused {fused['noisy_recall']:.0%}, ROUGE-L alone "
         f"{ranking['by_ranking']['rank_rouge_l']['noisy_recall']:.0%}, CE alone {ranking['by_ranking']['rank_ce_loss']['noisy_recall']:.0%}; "
         f"rank agreement {ranking['rank_agreement']:.2f}; Spearman(rank, level) {ranking['difficulty_rank_vs_level']:.2f}")

    if settings.arms != DEFAULT_ARMS:
        return run_seed_arms(settings, out, seed, shared, echo, student_dir, student, score_dir, curriculum_dir, score_key, scoring)

    echo(f"[seed {seed}] stratified curriculum: srdata export --stratify {STRATIFY_COLUMN} (arm added after the first comparison)")
    stratified_dir = seed_dir / "curriculum-stratified"

    def make_stratified() -> dict[str, Any]:
        seconds = run_command(
            cli("srdata") + ["export", str(score_dir), "--stages", str(settings.stages), "--keep", str(settings.keep),
                             "--stratify", STRATIFY_COLUMN, "--out", str(stratified_dir)],
            seed_dir / "logs" / "export-stratified.log", echo)
        return {"export_seconds": seconds,
                "task_shares": {"srd": curriculum_task_shares(curriculum_dir, score_dir), "srd_stratified": curriculum_task_shares(stratified_dir, score_dir)}}

    stratified = cached(records / f"seed-{seed}-stratified-export.json", {**score_key, "stratify": STRATIFY_COLUMN}, make_stratified, echo)
    srd_stage0 = stratified["task_shares"]["srd"]["stage 0"]
    echo("    share of each task in stage 0: SRD " + ", ".join(f"{t} {v:.0%}" for t, v in srd_stage0.items())
         + "; stratified " + ", ".join(f"{t} {v:.0%}" for t, v in stratified["task_shares"]["srd_stratified"]["stage 0"].items()))

    arms: dict[str, dict[str, Any]] = {}
    for loss_index, loss in enumerate(settings.losses):
        arms[loss] = {}
        # Alternate which arm runs first, so a slow spell of a shared machine does not
        # always land on the same arm.
        for arm in (ARMS if (settings.seeds.index(seed) + loss_index) % 2 == 0 else ARMS[::-1]):
            echo(f"[seed {seed}] {loss} / {ARM_LABELS[arm]}")
            if arm == "srd":
                data_args = ["--curriculum", str(curriculum_dir), "--epochs", str(settings.srd_epochs_per_stage)]
            else:
                data_args = ["--data", str(score_dir / "annotated.parquet"), "--epochs", str(settings.baseline_epochs),
                             "--kd-ratio", str(settings.baseline_kd_ratio), "--temperature", str(settings.baseline_temperature)]
            arms[loss][arm] = train_arm(settings, out, seed, shared, student_dir, f"{loss}-{arm}", loss, data_args, score_key, echo,
                                        arm_key=arm)
        # The added arm runs after both main arms, with the SRD arm's training settings.
        echo(f"[seed {seed}] {loss} / {ARM_LABELS['srd_stratified']}")
        arms[loss]["srd_stratified"] = train_arm(
            settings, out, seed, shared, student_dir, f"{loss}-srd-stratified", loss,
            ["--curriculum", str(stratified_dir), "--epochs", str(settings.srd_epochs_per_stage)], score_key, echo, arm_key="srd_stratified")
    result = {"student": student, "scoring": {k: v for k, v in scoring.items() if k != "ranking"}, "ranking": ranking, "arms": arms,
              "stratified_export": stratified}
    if diagnostics:
        result["diagnostics"] = run_diagnostics(settings, out, seed, shared, student_dir, score_dir, score_key, echo)
    return result


def run_seed_arms(settings: Settings, out: Path, seed: int, shared: dict[str, Any], echo: Callable[[str], None], student_dir: Path,
                  student: dict[str, Any], score_dir: Path, curriculum_dir: Path, score_key: dict[str, Any],
                  scoring: dict[str, Any]) -> dict[str, Any]:
    """The arms of ``settings.arms`` for every loss (the two-regime comparison), after the student and the scores.

    With an arm of ``TEACH_ARMS``: ``srdata teach --top-k K`` on the scored run (once per seed,
    its time charged in full to each arm that needs it), then for ``srd_teachable``
    ``srdata export --rank-by teachable``.
    """
    seed_dir = out / f"seed-{seed}"
    records = out / "records"
    passes: dict[str, Any] = {}
    if any(arm in TEACH_ARMS for arm in settings.arms):
        echo(f"[seed {seed}] teacher pass: srdata teach --top-k {settings.top_k}")

        def make_teach() -> dict[str, Any]:
            seconds = run_command(cli("srdata") + ["teach", str(score_dir), "--teacher", str(shared["teacher_dir"]), "--top-k", str(settings.top_k),
                                                   "--device", "cpu", "--dtype", "float32", "--overwrite", "--quiet"],
                                  seed_dir / "logs" / "teach.log", echo)
            return {"teach_seconds": seconds, "teach_cpu_seconds": LAST_CPU_SECONDS[0]}

        passes["teach"] = cached(records / f"seed-{seed}-teach.json", {**score_key, "top_k": settings.top_k}, make_teach, echo)
    curricula = {"srd": curriculum_dir}
    if "srd_teachable" in settings.arms:
        teachable_dir = seed_dir / "curriculum-teachable"

        def make_teachable() -> dict[str, Any]:
            seconds = run_command(cli("srdata") + ["export", str(score_dir), "--stages", str(settings.stages), "--keep", str(settings.keep),
                                                   "--rank-by", "teachable", "--out", str(teachable_dir)],
                                  seed_dir / "logs" / "export-teachable.log", echo)
            return {"export_seconds": seconds, "task_shares": {"srd": curriculum_task_shares(curriculum_dir, score_dir),
                                                                "srd_teachable": curriculum_task_shares(teachable_dir, score_dir)}}

        passes["teachable_export"] = cached(records / f"seed-{seed}-teachable-export.json", {**score_key, "top_k": settings.top_k, "rank_by": "teachable"},
                                            make_teachable, echo)
        curricula["srd_teachable"] = teachable_dir
    arms: dict[str, dict[str, Any]] = {}
    for loss_index, loss in enumerate(settings.losses):
        arms[loss] = {}
        # Rotate which arm runs first, so a slow spell of a shared machine does not always land on the same arm.
        shift = (settings.seeds.index(seed) + loss_index) % len(settings.arms)
        for arm in settings.arms[shift:] + settings.arms[:shift]:
            echo(f"[seed {seed}] {loss} / {ARM_LABELS[arm]}")
            baseline_args = ["--epochs", str(settings.baseline_epochs), "--kd-ratio", str(settings.baseline_kd_ratio),
                             "--temperature", str(settings.baseline_temperature)]
            if arm in curricula:
                data_args = ["--curriculum", str(curricula[arm]), "--epochs", str(settings.srd_epochs_per_stage)]
            elif arm == "baseline":
                data_args = ["--data", str(score_dir / "annotated.parquet"), *baseline_args]
            elif arm == "baseline_offline":
                data_args = ["--data", str(score_dir / "annotated.parquet"), *baseline_args, "--teacher-logits", str(score_dir)]
            else:
                raise ValueError(f"unknown arm {arm!r}; use some of {', '.join(COMPARISON_ARMS + DEFAULT_ARMS[2:])}")
            arms[loss][arm] = train_arm(settings, out, seed, shared, student_dir, f"{loss}-{arm.replace('_', '-')}", loss, data_args,
                                        score_key, echo, arm_key=arm, online=arm != "baseline_offline")
    return {"student": student, "scoring": {k: v for k, v in scoring.items() if k != "ranking"}, "ranking": scoring["ranking"],
            "arms": arms, **passes}


def curriculum_task_shares(curriculum_dir: Path, score_dir: Path) -> dict[str, dict[str, float]]:
    """Share of each task in every stage file and in the dropped part, counted from the files themselves."""
    import polars as pl

    summary = json.loads((curriculum_dir / "curriculum.json").read_text(encoding="utf-8"))
    annotated = pl.read_parquet(score_dir / "annotated.parquet", columns=["srd_id", STRATIFY_COLUMN, "difficulty_rank"])
    annotated = annotated.filter(pl.col("difficulty_rank").is_not_null())
    parts: dict[str, pl.DataFrame] = {}
    for stage in summary["stages"]:
        parts[f"stage {stage['stage']}"] = pl.read_parquet(curriculum_dir / stage["file"], columns=["srd_id", STRATIFY_COLUMN])
    kept = set(pl.concat(list(parts.values()))["srd_id"].to_list())
    parts["dropped"] = annotated.filter(~pl.col("srd_id").is_in(list(kept)))
    tasks = sorted(set(annotated[STRATIFY_COLUMN].to_list()))
    return {name: {t: rows.filter(pl.col(STRATIFY_COLUMN) == t).height / rows.height if rows.height else 0.0 for t in tasks}
            for name, rows in parts.items()}


def train_arm(settings: Settings, out: Path, seed: int, shared: dict[str, Any], student_dir: Path, name: str, loss: str,
              data_args: list[str], score_key: dict[str, Any], echo: Callable[[str], None], schedule: Optional[str] = None,
              arm_key: Optional[str] = None, online: bool = True) -> dict[str, Any]:
    """One ``srd-distill train`` run (cached), its timings, sample passes and test evaluation."""
    files = shared["files"]
    seed_dir = out / f"seed-{seed}"
    run_dir = seed_dir / name
    teacher = ["--teacher", str(shared["teacher_dir"])] if online else []  # offline: --teacher-logits in data_args
    common = [*teacher, "--student", str(student_dir), "--output", str(run_dir),
              "--loss", loss, "--schedule", schedule or settings.schedule, "--lr", str(settings.lr),
              "--batch-size", str(settings.batch_size), "--seed", str(seed), "--device", "cpu",
              "--eval-file", str(files.dev), "--eval-max-new-tokens", str(settings.max_new_tokens),
              "--overwrite", "--quiet", *settings.extra_train_flags]
    args = cli("srd-distill") + ["train", *data_args, *common]
    key = {**score_key, "arm": arm_key or name, "loss": loss, "args": args[len(cli("srd-distill")):]}

    def make_arm() -> dict[str, Any]:
        process_seconds = run_command(args, seed_dir / "logs" / f"{name}.log", echo)
        process_cpu_seconds = LAST_CPU_SECONDS[0]
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        finished = sorted(run["stages_finished"], key=lambda s: s["stage"])
        final = run_dir / f"stage-{finished[-1]['stage']}"
        return {
            "process_seconds": process_seconds,
            "process_cpu_seconds": process_cpu_seconds,
            "train_seconds": sum(s["seconds"] for s in finished),
            "sample_passes": sum(s["rows"] * s["epochs"] for s in finished),
            "steps": sum(s["steps"] for s in finished),
            "stages": [{k: s[k] for k in ("stage", "rows", "epochs", "steps", "kd_ratio", "temperature", "kept_epoch", "best_eval_rouge_l", "seconds")}
                       for s in finished],
            "checkpoint": str(final.relative_to(out)),
            "test": evaluate_model(final, files.test, max_new_tokens=settings.max_new_tokens),
        }

    result = cached(out / "records" / f"seed-{seed}-{name}.json", key, make_arm, echo)
    echo(f"    test exact match {result['test']['overall']['exact_match']:.3f}, ROUGE-L {result['test']['overall']['rouge_l']:.3f}, "
         f"{result['sample_passes']:,} sample passes, training {result['train_seconds']:.0f}s")
    return result


DIAGNOSTICS = {
    "keep4": "curriculum on all 4 parts (POCL-style, nothing dropped), pocl schedule, E epochs/stage: 10 N passes, the baseline's budget",
    "kept75_shuffled": "the baseline's loss (kd_ratio 1, T 1) on SRD's kept 75%, no curriculum, 8 epochs: 6 N passes, SRD's budget",
    "srd_long": "SRD as in the main arm but 7 epochs/stage: 10.5 N passes, about the baseline's budget",
}


def run_diagnostics(settings: Settings, out: Path, seed: int, shared: dict[str, Any], student_dir: Path, score_dir: Path,
                    score_key: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Post-hoc variants (first loss only) that separate the effects of dropping, ordering and budget."""
    loss = settings.losses[0]
    seed_dir = out / f"seed-{seed}"
    keep4_dir = seed_dir / "curriculum-keep4"
    if not (keep4_dir / "curriculum.json").is_file():
        run_command(cli("srdata") + ["export", str(score_dir), "--stages", str(settings.stages), "--keep", str(settings.stages),
                                     "--out", str(keep4_dir)], seed_dir / "logs" / "export-keep4.log", echo)
    kept = seed_dir / "curriculum" / f"stage-{settings.keep - 1}.parquet"
    e = settings.srd_epochs_per_stage
    variants = {
        "keep4": (["--curriculum", str(keep4_dir), "--epochs", str(e)], "pocl"),
        "kept75_shuffled": (["--data", str(kept), "--epochs", str(round(e * 2)), "--kd-ratio", str(settings.baseline_kd_ratio),
                             "--temperature", str(settings.baseline_temperature)], None),
        "srd_long": (["--curriculum", str(seed_dir / "curriculum"), "--epochs", str(round(e * 7 / 4))], None),
    }
    results = {}
    for name, (data_args, schedule) in variants.items():
        echo(f"[seed {seed}] diagnostic {loss} / {name}: {DIAGNOSTICS[name]}")
        results[name] = train_arm(settings, out, seed, shared, student_dir, f"{loss}-diag-{name}", loss, data_args, score_key, echo,
                                  schedule=schedule)
    return {loss: results}



# ======================================================================================
# Aggregation, table, figure
# ======================================================================================


def aggregate(settings: Settings, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of every reported figure, per loss and arm."""
    seeds = sorted(per_seed)
    levels = [str(level) for level in settings.testbed.levels]
    out: dict[str, Any] = {"arms": {}, "paired_difference_srd_minus_baseline": {}, "ranking": {}, "student_initial": {}}
    for loss in settings.losses:
        out["arms"][loss] = {}
        arm_names = settings.arms if settings.arms != DEFAULT_ARMS else (*ARMS, *(a for a in ADDED_ARMS if all(a in per_seed[s]["arms"][loss] for s in seeds)))
        for arm in arm_names:
            runs = [per_seed[s]["arms"][loss][arm] for s in seeds]
            entry = {
                "exact_match": stats([r["test"]["overall"]["exact_match"] for r in runs]),
                "rouge_l": stats([r["test"]["overall"]["rouge_l"] for r in runs]),
                "exact_match_by_difficulty": {lv: stats([r["test"]["by_difficulty"][lv]["exact_match"] for r in runs]) for lv in levels},
                "rouge_l_by_difficulty": {lv: stats([r["test"]["by_difficulty"][lv]["rouge_l"] for r in runs]) for lv in levels},
                "exact_match_by_task": {t: stats([r["test"]["by_task"][t]["exact_match"] for r in runs]) for t in settings.testbed.tasks},
                "train_seconds": stats([r["train_seconds"] for r in runs]),
                "process_seconds": stats([r["process_seconds"] for r in runs]),
                "process_cpu_seconds": stats([r["process_cpu_seconds"] for r in runs]),
                "sample_passes": stats([r["sample_passes"] for r in runs]),
                "steps": stats([r["steps"] for r in runs]),
            }
            if settings.arms != DEFAULT_ARMS:
                overhead = [pass_seconds(per_seed[s], arm) for s in seeds]
                entry["scoring_seconds"] = stats(overhead)
                entry["train_plus_scoring_seconds"] = stats([r["train_seconds"] + o for r, o in zip(runs, overhead)])
            elif arm in ("srd", "srd_stratified"):
                scoring = [per_seed[s]["scoring"] for s in seeds]
                exports = ([c["export_seconds"] for c in scoring] if arm == "srd"
                           else [per_seed[s]["stratified_export"]["export_seconds"] for s in seeds])
                entry["scoring_seconds"] = stats([c["score_seconds"] + x for c, x in zip(scoring, exports)])
                entry["train_plus_scoring_seconds"] = stats([r["train_seconds"] + c["score_seconds"] + x for r, c, x in zip(runs, scoring, exports)])
            out["arms"][loss][arm] = entry
        if settings.arms != DEFAULT_ARMS:
            out.setdefault("paired_differences", {})[loss] = paired_differences(settings, per_seed, loss)
            continue
        diffs = {}
        for metric in ("exact_match", "rouge_l"):
            diffs[metric] = stats([per_seed[s]["arms"][loss]["srd"]["test"]["overall"][metric] - per_seed[s]["arms"][loss]["baseline"]["test"]["overall"][metric] for s in seeds])
        diffs["train_seconds_ratio"] = stats([per_seed[s]["arms"][loss]["srd"]["train_seconds"] / per_seed[s]["arms"][loss]["baseline"]["train_seconds"] for s in seeds])
        diffs["sample_passes_ratio"] = stats([per_seed[s]["arms"][loss]["srd"]["sample_passes"] / per_seed[s]["arms"][loss]["baseline"]["sample_passes"] for s in seeds])
        out["paired_difference_srd_minus_baseline"][loss] = diffs
        if "srd_stratified" in out["arms"][loss]:
            out.setdefault("paired_difference_added_arms", {})[loss] = {
                f"srd_stratified_minus_{other}": {
                    metric: stats([per_seed[s]["arms"][loss]["srd_stratified"]["test"]["overall"][metric]
                                   - per_seed[s]["arms"][loss][other]["test"]["overall"][metric] for s in seeds])
                    for metric in ("exact_match", "rouge_l")}
                for other in ARMS}
    if settings.arms != DEFAULT_ARMS:
        del out["paired_difference_srd_minus_baseline"]
        if all("teachable_export" in per_seed[s] for s in seeds):
            shares = [per_seed[s]["teachable_export"]["task_shares"] for s in seeds]
            out["task_shares"] = {arm: {part: {t: stats([sh[arm][part][t] for sh in shares]) for t in shares[0][arm][part]}
                                        for part in shares[0][arm]} for arm in shares[0]}
    rankings = [per_seed[s]["ranking"] for s in seeds]
    out["ranking"] = {
        "noisy_recall": {col: stats([r["by_ranking"][col]["noisy_recall"] for r in rankings]) for col in rankings[0]["by_ranking"]},
        "noisy_precision": {col: stats([r["by_ranking"][col]["noisy_precision"] for r in rankings]) for col in rankings[0]["by_ranking"]},
        "rank_agreement": stats([r["rank_agreement"] for r in rankings]),
        "difficulty_rank_vs_level": stats([r["difficulty_rank_vs_level"] for r in rankings]),
        "mean_difficulty_rank_by_level": {lv: stats([r["by_difficulty"][lv]["mean_difficulty_rank"] for r in rankings]) for lv in levels},
        "dropped_share_by_level": {lv: stats([r["by_difficulty"][lv]["dropped_share"] for r in rankings]) for lv in levels},
        "dropped_share_by_task": {t: stats([r["by_task"][t]["dropped_share"] for r in rankings]) for t in settings.testbed.tasks},
    }
    if all("stratified_export" in per_seed[s] for s in seeds):
        shares = [per_seed[s]["stratified_export"]["task_shares"] for s in seeds]
        out["task_shares"] = {arm: {part: {t: stats([sh[arm][part][t] for sh in shares]) for t in shares[0][arm][part]}
                                    for part in shares[0][arm]} for arm in shares[0]}
    if all("diagnostics" in per_seed[s] for s in seeds):
        out["diagnostics"] = {}
        for loss, variants in per_seed[seeds[0]]["diagnostics"].items():
            out["diagnostics"][loss] = {}
            for name in variants:
                runs = [per_seed[s]["diagnostics"][loss][name] for s in seeds]
                out["diagnostics"][loss][name] = {
                    "description": DIAGNOSTICS[name],
                    "exact_match": stats([r["test"]["overall"]["exact_match"] for r in runs]),
                    "rouge_l": stats([r["test"]["overall"]["rouge_l"] for r in runs]),
                    "exact_match_by_difficulty": {lv: stats([r["test"]["by_difficulty"][lv]["exact_match"] for r in runs]) for lv in levels},
                    "exact_match_by_task": {t: stats([r["test"]["by_task"][t]["exact_match"] for r in runs]) for t in settings.testbed.tasks},
                    "train_seconds": stats([r["train_seconds"] for r in runs]),
                    "sample_passes": stats([r["sample_passes"] for r in runs]),
                }
    students = [per_seed[s]["student"]["test"] for s in seeds]
    out["student_initial"] = {
        "exact_match": stats([t["overall"]["exact_match"] for t in students]),
        "rouge_l": stats([t["overall"]["rouge_l"] for t in students]),
        "exact_match_by_difficulty": {lv: stats([t["by_difficulty"][lv]["exact_match"] for t in students]) for lv in levels},
    }
    return out


def pass_seconds(seed_record: dict[str, Any], arm: str) -> float:
    """Seconds of the data passes an arm of the comparison needs before training (0 for online full-data KD).

    SRD: ``srdata score`` + ``export``; SRD teachable: score + ``teach`` + ``export --rank-by
    teachable``; offline full-data KD: score + teach (``srdata teach`` needs a scored run). The one
    teach pass of a seed (with top-K) is charged in full to each arm that uses it.
    """
    scoring = seed_record["scoring"]
    teach = seed_record.get("teach", {}).get("teach_seconds", 0.0)
    if arm == "srd":
        return scoring["score_seconds"] + scoring["export_seconds"]
    if arm == "srd_teachable":
        return scoring["score_seconds"] + teach + seed_record["teachable_export"]["export_seconds"]
    if arm == "baseline_offline":
        return scoring["score_seconds"] + teach
    return 0.0


def paired_differences(settings: Settings, per_seed: dict[int, dict[str, Any]], loss: str) -> dict[str, Any]:
    """Per-seed differences of every arm against online full-data KD, and of SRD teachable against SRD."""
    seeds = sorted(per_seed)
    pairs = [(arm, "baseline") for arm in settings.arms if arm != "baseline"]
    if "srd" in settings.arms and "srd_teachable" in settings.arms:
        pairs.append(("srd_teachable", "srd"))
    out: dict[str, Any] = {}
    for arm, other in pairs:
        a = [per_seed[s]["arms"][loss][arm] for s in seeds]
        b = [per_seed[s]["arms"][loss][other] for s in seeds]
        entry = {metric: stats([x["test"]["overall"][metric] - y["test"]["overall"][metric] for x, y in zip(a, b)])
                 for metric in ("exact_match", "rouge_l")}
        entry["exact_match_by_task"] = {t: stats([x["test"]["by_task"][t]["exact_match"] - y["test"]["by_task"][t]["exact_match"] for x, y in zip(a, b)])
                                        for t in settings.testbed.tasks}
        entry["train_seconds_ratio"] = stats([x["train_seconds"] / y["train_seconds"] for x, y in zip(a, b)])
        entry["process_cpu_seconds_ratio"] = stats([x["process_cpu_seconds"] / y["process_cpu_seconds"] for x, y in zip(a, b)])
        entry["train_plus_passes_seconds_ratio"] = stats([(x["train_seconds"] + pass_seconds(per_seed[s], arm)) / (y["train_seconds"] + pass_seconds(per_seed[s], other))
                                                          for s, x, y in zip(seeds, a, b)])
        entry["sample_passes_ratio"] = stats([x["sample_passes"] / y["sample_passes"] for x, y in zip(a, b)])
        out[f"{arm}_minus_{other}"] = entry
    return out


def _pm(entry: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if entry["mean"] is None:
        return "n/a"
    return f"{entry['mean'] * scale:.{digits}f} ± {entry['std'] * scale:.{digits}f}"


def markdown_table(settings: Settings, results: dict[str, Any]) -> str:
    """The results table (mean ± sample standard deviation over seeds)."""
    summary = results["summary"]
    levels = [str(level) for level in settings.testbed.levels]
    n = len(settings.seeds)
    lines = [
        f"Test set: {settings.testbed.test_pairs} clean pairs; mean ± standard deviation over {n} seed(s); EM = exact match (%), "
        "ROUGE-L x100; time = `srd-distill train` stage time in seconds (in brackets: + the score/teach/export passes the arm needs).",
        "",
        "| loss | arm | EM | ROUGE-L | " + " | ".join(f"EM level {lv}" for lv in levels) + " | train time (s) | sample passes |",
        "|---|---|---|---|" + "---|" * len(levels) + "---|---|",
    ]
    teacher = results["teacher"]["test"]
    lines.append(f"| - | teacher | {teacher['overall']['exact_match'] * 100:.1f} | {teacher['overall']['rouge_l'] * 100:.1f} | "
                 + " | ".join(f"{teacher['by_difficulty'][lv]['exact_match'] * 100:.1f}" for lv in levels) + " | - | - |")
    student = summary["student_initial"]
    lines.append(f"| - | student before KD | {_pm(student['exact_match'], 100)} | {_pm(student['rouge_l'], 100)} | "
                 + " | ".join(_pm(student["exact_match_by_difficulty"][lv], 100) for lv in levels) + " | - | - |")
    for loss in settings.losses:
        for arm in summary["arms"][loss]:
            e = summary["arms"][loss][arm]
            time_text = _pm(e["train_seconds"], 1, 0)
            if "scoring_seconds" in e:
                time_text += f" (+{e['scoring_seconds']['mean']:.0f})"
            lines.append(f"| {loss} | {ARM_NAMES[arm]} | {_pm(e['exact_match'], 100)} | {_pm(e['rouge_l'], 100)} | "
                         + " | ".join(_pm(e["exact_match_by_difficulty"][lv], 100) for lv in levels)
                         + f" | {time_text} | {e['sample_passes']['mean']:,.0f} |")
    for loss, variants in summary.get("diagnostics", {}).items():
        for name, e in variants.items():
            lines.append(f"| {loss} | diagnostic: {name} | {_pm(e['exact_match'], 100)} | {_pm(e['rouge_l'], 100)} | "
                         + " | ".join(_pm(e["exact_match_by_difficulty"][lv], 100) for lv in levels)
                         + f" | {_pm(e['train_seconds'], 1, 0)} | {e['sample_passes']['mean']:,.0f} |")
    lines += ["", "Exact match (%) by task:", "", "| loss | arm | " + " | ".join(settings.testbed.tasks) + " |",
              "|---|---|" + "---|" * len(settings.testbed.tasks)]
    for loss in settings.losses:
        for arm in summary["arms"][loss]:
            e = summary["arms"][loss][arm]
            lines.append(f"| {loss} | {ARM_NAMES[arm]} | "
                         + " | ".join(_pm(e["exact_match_by_task"][t], 100) for t in settings.testbed.tasks) + " |")
    for loss, variants in summary.get("diagnostics", {}).items():
        for name, e in variants.items():
            lines.append(f"| {loss} | diagnostic: {name} | " + " | ".join(_pm(e["exact_match_by_task"][t], 100) for t in settings.testbed.tasks) + " |")
    if "paired_differences" in summary:
        lines += ["", "Paired differences (same seed; EM and ROUGE-L in points, times as ratios; 'with passes' adds the "
                  "score/teach/export passes each arm needs):", ""]
        for loss, pairs in summary["paired_differences"].items():
            for name, d in pairs.items():
                arm, other = name.split("_minus_")
                lines.append(f"- {loss}: {ARM_NAMES[arm]} - {ARM_NAMES[other]}: EM {_pm(d['exact_match'], 100)} "
                             f"(per seed {', '.join(f'{v * 100:+.1f}' for v in d['exact_match']['values'])}), "
                             f"ROUGE-L {_pm(d['rouge_l'], 100)}, training time ratio {_pm(d['train_seconds_ratio'], 1, 2)}, "
                             f"with passes {_pm(d['train_plus_passes_seconds_ratio'], 1, 2)}, sample-pass ratio {d['sample_passes_ratio']['mean']:.2f}")
    lines += ["", "Paired difference SRD - full-data KD (same seed):", ""] if "paired_difference_srd_minus_baseline" in summary else []
    for loss in settings.losses if "paired_difference_srd_minus_baseline" in summary else ():
        d = summary["paired_difference_srd_minus_baseline"][loss]
        lines.append(f"- {loss}: EM {_pm(d['exact_match'], 100)} points, ROUGE-L {_pm(d['rouge_l'], 100)} points, "
                     f"training time ratio {_pm(d['train_seconds_ratio'], 1, 2)}, sample-pass ratio {d['sample_passes_ratio']['mean']:.2f}")
    for loss, pairs in summary.get("paired_difference_added_arms", {}).items():
        for name, d in pairs.items():
            other = ARM_NAMES[name.removeprefix("srd_stratified_minus_")]
            lines.append(f"- {loss}, added arm: SRD stratified - {other}: EM {_pm(d['exact_match'], 100)} points, "
                         f"ROUGE-L {_pm(d['rouge_l'], 100)} points")
    if "task_shares" in summary:
        tasks = list(summary["task_shares"]["srd"]["stage 0"])
        lines += ["", f"Share of each task (%) in stage 0 and in the dropped part (every task is {100 / len(tasks):.0f}% of the data):", "",
                  "| curriculum | part | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for arm, parts in summary["task_shares"].items():
            for part in ("stage 0", "dropped"):
                lines.append(f"| {ARM_NAMES[arm]} | {part} | " + " | ".join(_pm(parts[part][t], 100, 0) for t in tasks) + " |")
    r = summary["ranking"]
    names = {"difficulty_rank": "fused (SRD)", "rank_rouge_l": "ROUGE-L alone", "rank_ce_loss": "cross-entropy alone"}
    lines += ["", "Noisy training pairs in the dropped quarter (chance 25%):", "",
              "| ranking | noisy pairs dropped (%) | noise share of the dropped quarter (%) |", "|---|---|---|"]
    for col, name in names.items():
        lines.append(f"| {name} | {_pm(r['noisy_recall'][col], 100)} | {_pm(r['noisy_precision'][col], 100)} |")
    lines += ["", f"Rank agreement of ROUGE-L and cross-entropy rankings (Spearman): {_pm(r['rank_agreement'], 1, 2)}; "
              f"Spearman(difficulty rank, known level): {_pm(r['difficulty_rank_vs_level'], 1, 2)}; "
              "dropped share by level: " + ", ".join(f"{lv}: {r['dropped_share_by_level'][lv]['mean'] * 100:.0f}%" for lv in levels)
              + "; by task: " + ", ".join(f"{t}: {v['mean'] * 100:.0f}%" for t, v in r["dropped_share_by_task"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(settings: Settings, results: dict[str, Any], path: Path) -> Path:
    """Test quality vs training time per arm (one point per seed, mean with error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"srd": "tab:blue", "baseline": "tab:orange", "srd_stratified": "tab:green", "srd_teachable": "tab:purple",
               "baseline_offline": "tab:brown"}
    markers = ["o", "s", "^", "D", "v", "P"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "rouge_l", "test ROUGE-L (x100)"), (axes[1], "exact_match", "test exact match (%)")):
        for i, loss in enumerate(settings.losses):
            for arm in results["summary"]["arms"][loss]:
                e = results["summary"]["arms"][loss][arm]
                xs, ys = e["train_seconds"]["values"], [v * 100 for v in e[metric]["values"]]
                ax.scatter(xs, ys, color=colours[arm], marker=markers[i % len(markers)], alpha=0.35, s=22)
                ax.errorbar(e["train_seconds"]["mean"], e[metric]["mean"] * 100, xerr=e["train_seconds"]["std"],
                            yerr=e[metric]["std"] * 100, color=colours[arm], marker=markers[i % len(markers)], markersize=8,
                            capsize=3, label=f"{loss} {ARM_NAMES[arm]}")
                if "train_plus_scoring_seconds" in e:
                    total = e["train_plus_scoring_seconds"]["mean"]
                    ax.annotate("", xy=(total, e[metric]["mean"] * 100), xytext=(e["train_seconds"]["mean"], e[metric]["mean"] * 100),
                                arrowprops=dict(arrowstyle="-|>", color=colours[arm], alpha=0.5, linestyle=":"))
        teacher = results["teacher"]["test"]["overall"][metric] * 100
        student = results["summary"]["student_initial"][metric]["mean"] * 100
        ax.axhline(teacher, color="grey", linestyle="--", linewidth=1, label="teacher")
        ax.axhline(student, color="grey", linestyle=":", linewidth=1, label="student before KD")
        ax.set_xlabel("training wall-clock (s); dotted arrow: + the score/teach/export passes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    regime = f"'{settings.regime}' regime, " if settings.regime else ""
    fig.suptitle(f"SRD vs full-data KD on the testbed ({regime}{len(settings.seeds)} seed(s), {settings.testbed.train_pairs} training pairs, "
                 f"{settings.testbed.noise_fraction:.0%} noisy; run of {results['started_at'][:10]})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ======================================================================================
# Entry point
# ======================================================================================


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "command_threads": COMMAND_THREADS, "torch": torch.__version__,
                            "niceness": os.nice(0)}
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def reproduce(settings: Settings, out: Path, *, mode: str, echo: Callable[[str], None] = print,
              publish_dir: Optional[Path] = None, diagnostics: bool = False) -> dict[str, Any]:
    """Run the whole comparison into ``out``; return the results (also written to ``out/results.json``).

    Example:
        >>> reproduce(QUICK, Path("runs/repro-quick"), mode="quick")   # doctest: +SKIP
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine_start = machine()
    out.mkdir(parents=True, exist_ok=True)
    echo(f"SRD end-to-end reproduction ({mode} mode) into {out}")
    shared = prepare_models(settings, out, echo)
    per_seed = {seed: run_seed(settings, out, seed, shared, echo, diagnostics) for seed in settings.seeds}
    results: dict[str, Any] = {
        "format_version": 1,
        "mode": mode,
        "started_at": started_at,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"at_start": machine_start, "at_end": machine()},
        "settings": settings.describe(),
        "teacher": shared["teacher"],
        "summary": aggregate(settings, per_seed),
        "seeds": {str(seed): value for seed, value in per_seed.items()},
    }
    write_json_atomic(out / "results.json", results)
    table = markdown_table(settings, results)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot(settings, results, out / "quality_vs_time.png")
    if publish_dir is not None and settings.regime is not None:
        # The two-regime comparison: one record and figure per regime, never merged with the first comparison's.
        write_json_atomic(publish_dir / f"results-{settings.regime}.json", results)
        plot(settings, results, publish_dir / f"quality_vs_time-{settings.regime}.png")
        (publish_dir / f"table-{settings.regime}.md").write_text(table, encoding="utf-8")
    elif publish_dir is not None:
        published = publish_dir / "results.json"
        previous = json.loads(published.read_text(encoding="utf-8")) if published.is_file() else None
        same_settings = previous is not None and previous.get("settings") == json.loads(json.dumps(results["settings"]))
        if diagnostics and same_settings and "diagnostics" not in previous["summary"]:
            # A diagnostics rerun reuses the main arms: keep the main run's record (its
            # wall-clock covers the whole pipeline) and add the post-hoc variants to it.
            previous["summary"]["diagnostics"] = results["summary"]["diagnostics"]
            previous["diagnostics_run"] = {"started_at": started_at, "invocation_wall_seconds": results["wall_seconds"],
                                           "note": "wall-clock of the invocation that merged the variants; cached steps were reused, "
                                                   "see each variant's train_seconds",
                                           "seeds": {k: v.get("diagnostics") for k, v in results["seeds"].items()}}
            write_json_atomic(published, previous)
            plot(settings, results, publish_dir / "quality_vs_time.png")
        elif same_settings and not _has_added_arms(previous):
            # The arms added after the first comparison join the published record; the main
            # arms keep their first record (and its timings), checked against this rerun.
            merged = merge_added_arms(previous, results)
            write_json_atomic(published, merged)
            # The figure shows this rerun: every arm timed in the same invocation, on the same machine load.
            plot(settings, results, publish_dir / "quality_vs_time.png")
        else:
            write_json_atomic(published, results)
            plot(settings, results, publish_dir / "quality_vs_time.png")
    echo("")
    echo(table)
    echo(format_ranking_summary(per_seed[settings.seeds[0]]["ranking"]).replace("\n", "\n  ").join(["  (seed %d) " % settings.seeds[0], ""]))
    echo(f"total wall-clock: {results['wall_seconds']:.0f}s; results: {out / 'results.json'}"
         + (f" and {publish_dir / (f'results-{settings.regime}.json' if settings.regime else 'results.json')}" if publish_dir else ""))
    return results


def _has_added_arms(record: dict[str, Any]) -> bool:
    return all(arm in arms for arms in record["summary"]["arms"].values() for arm in ADDED_ARMS)


def merge_added_arms(previous: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """``previous`` (the published record of the first comparison) with the added arms of ``results`` merged in.

    Records whether this rerun reproduced the main arms' test figures seed by seed: the
    added arms' paired differences are taken against the main arms of the same rerun.
    """
    merged = json.loads(json.dumps(previous))
    reproduced: dict[str, dict[str, bool]] = {}
    for loss, arms in merged["summary"]["arms"].items():
        for arm in ADDED_ARMS:
            arms[arm] = results["summary"]["arms"][loss][arm]
        reproduced[loss] = {
            arm: all(previous["seeds"][s]["arms"][loss][arm]["test"]["overall"] == results["seeds"][s]["arms"][loss][arm]["test"]["overall"]
                     for s in previous["seeds"])
            for arm in ARMS}
    for key in ("paired_difference_added_arms", "task_shares"):
        merged["summary"][key] = results["summary"][key]
    for seed, record in merged["seeds"].items():
        for loss, arms in record["arms"].items():
            for arm in ADDED_ARMS:
                arms[arm] = results["seeds"][seed]["arms"][loss][arm]
        record["stratified_export"] = results["seeds"][seed]["stratified_export"]
    merged["added_arms_run"] = {
        "arms": {arm: ARM_LABELS[arm] for arm in ADDED_ARMS},
        "started_at": results["started_at"],
        "invocation_wall_seconds": results["wall_seconds"],
        "machine": results["machine"],
        "main_arms_reproduced": reproduced,
        "main_arms_of_this_rerun": {loss: {arm: results["summary"]["arms"][loss][arm] for arm in ARMS} for loss in results["summary"]["arms"]},
        "note": "added after the first comparison; the main arms were rerun in the same invocation (same settings) and are "
                "compared with their first record in main_arms_reproduced; paired differences and quality_vs_time.png use "
                "this rerun's main arms",
    }
    return merged


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: nice -n 10 python benchmarks/repro/run.py --quick")
    parser.add_argument("--quick", action="store_true", help="small data, 1 seed, fkl only (<= 3 min); results stay in --out")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2 full, 0 quick)")
    parser.add_argument("--losses", help="comma-separated KD losses (default: fkl,rkl full, fkl quick)")
    parser.add_argument("--out", help="work folder (default: runs/repro or runs/repro-quick)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished steps")
    parser.add_argument("--no-publish", action="store_true", help="full mode: do not write benchmarks/repro/results.json and the figure")
    parser.add_argument("--regime", choices=REGIME_NAMES,
                        help="the pre-registered two-regime comparison (PLAN.md) on this testbed regime: arms "
                             f"{', '.join(COMPARISON_ARMS)}, 1,200 training pairs (quick: the quick sizes); full mode publishes "
                             "benchmarks/repro/results-REGIME.json. Without it: the first comparison (today's testbed)")
    parser.add_argument("--arms", help=f"comma-separated arms (default: {','.join(DEFAULT_ARMS)}; with --regime {','.join(COMPARISON_ARMS)})")
    parser.add_argument("--top-k", type=int, help="the teacher pass's top-K for the offline arm (default 32)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also run post-hoc variants for the first loss (keep all 4 parts; kept 75%% without curriculum; SRD with the "
                             "baseline's budget) and add them to the results under 'diagnostics' (the main arms are reused when cached)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.regime:
        settings = with_regime(REGIMES_QUICK if args.quick else REGIMES_FULL, args.regime)
    if args.arms:
        arms = tuple(a.strip() for a in args.arms.split(","))
        unknown = [a for a in arms if a not in ARM_NAMES]
        if unknown:
            print(f"ERROR: unknown arm(s) {', '.join(unknown)}; use some of {', '.join(ARM_NAMES)}", file=sys.stderr)
            return 2
        settings = replace(settings, arms=arms)
    if args.top_k:
        settings = replace(settings, top_k=args.top_k)
    if args.seeds:
        settings = replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.losses:
        settings = replace(settings, losses=tuple(s.strip() for s in args.losses.split(",")))
    mode = "quick" if args.quick else "full"
    suffix = f"-{args.regime}" if args.regime else ""
    out = Path(args.out or (f"runs/repro-quick{suffix}" if args.quick else f"runs/repro{suffix}"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    publish = None if (args.quick or args.no_publish) else HERE
    if args.regime:
        # The comparison trains its teacher and students in this process too: one intra-op thread, as its
        # commands, so that a shared machine does not lose most of its time to spinning threads.
        import torch

        torch.set_num_threads(COMMAND_THREADS)
    from srdata.demo.tiny import quiet_transformers

    try:
        with quiet_transformers():
            reproduce(settings, out, mode=mode, publish_dir=publish, diagnostics=args.diagnostics)
    except StepFailed as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
