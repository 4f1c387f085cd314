"""srd_distill end to end on CPU: tiny teacher/student sharing a tokenizer, a real exported curriculum.

The curriculum is cut by ``srdata.export_curriculum`` from a synthetic scored run (an
annotated.parquet with real SelfInst prompts and references, and a manifest), so the
files are exactly the ones ``srdata export`` writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

import srd_distill.train as train_module
from srd_distill.cli import main
from srd_distill.schedules import PRESETS, ScheduleError, load_schedule, with_epochs
from srd_distill.errors import CurriculumFilesError, RunFolderError, TokenizerMismatchError, TrainingSetupError
from srd_distill.train import train
from srdata.steps.prompts import ALPACA
from srdata.steps.tokenize import encode_pairs

from .conftest import DEMO_SAMPLE, corpus, write_jsonl

# Small and quick: short sequences, a few rows per stage, a learning rate that moves a tiny model.
PROMPT_SETTINGS = {"max_prompt_tokens": 48, "max_reference_tokens": 24, "truncation_side": "left"}
FAST = dict(batch_size=4, lr=3e-3, log_every=1, eval_max_new_tokens=4, device="cpu", dtype="float32")


def demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()]


def render(row: dict) -> str:
    return ALPACA.format(instruction=row["instruction"])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A warmed-up teacher, a smaller random student with the teacher's tokenizer, and a misfit."""
    from srdata.demo.tiny import build_tiny_model, train_on_pairs

    root = tmp_path_factory.mktemp("distill-models")
    teacher = build_tiny_model(root / "teacher", corpus(), arch="gpt2", hidden_size=64, num_layers=2, seed=1)
    rows = demo_rows()[:24]
    train_on_pairs(teacher, [render(r) for r in rows], [r["output"] for r in rows], steps=40, batch_size=8, lr=3e-3, seed=0)

    # The student: same tokenizer (saved from the teacher), smaller random GPT-2, no dropout
    # so that two runs that should agree do agree.
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=256, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(2)
    student_model = AutoModelForCausalLM.from_config(config)
    student = root / "student"
    student_model.save_pretrained(student)
    tokenizer.save_pretrained(student)

    other = build_tiny_model(root / "other", corpus()[:20], arch="gpt2", hidden_size=32, num_layers=1, vocab_size=300)
    return {"teacher": teacher, "student": student, "other": other}


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A finished `srdata score` run folder: annotated.parquet (24 rows, one flagged) + manifest.json."""
    from srdata.steps.rank import rank

    rows = demo_rows()[:24]
    n = len(rows)
    frame = pl.DataFrame(
        {
            "instruction": [r["instruction"] for r in rows],
            "output": [r["output"] for r in rows],
            "srd_id": list(range(n)),
            "prompt_text": [render(r) for r in rows],
            "reference_text": [r["output"] for r in rows],
            # Any scores will do: the curriculum only needs an order.
            "rouge_l": [None if i == 5 else (i * 37 % n) / n for i in range(n)],
            "ce_loss": [None if i == 5 else 1.0 + (i * 11 % n) / n for i in range(n)],
            "invalid_reason": ["empty prompt" if i == 5 else None for i in range(n)],
        },
        schema_overrides={"srd_id": pl.Int64},
    )
    run = tmp_path_factory.mktemp("scored") / "run"
    run.mkdir()
    rank(frame).write_parquet(run / "annotated.parquet")
    manifest = {
        "srdata_version": "0.1.0", "status": "complete", "config_hash": "test",
        "config": {"prompt": {**PROMPT_SETTINGS, "template": None, "eos_token": None}, "metrics": {"rouge_tokenizer": "default", "rrf_k": 60}},
        "template": "alpaca", "shards": [],
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture(scope="module")
def curriculum(scored_run) -> Path:
    import srdata

    return srdata.export_curriculum(scored_run)  # 4 parts, keep the easiest 3: 5 / 10 / 15 rows


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    rows = demo_rows()[40:46]
    path = tmp_path_factory.mktemp("eval") / "dev.jsonl"
    return write_jsonl(path, [{"prompt": render(r), "response": r["output"]} for r in rows])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def base(models, **kw) -> dict:
    return {"teacher": str(models["teacher"]), "student": str(models["student"]), **FAST, **kw}


def reference_ce(model_dir: Path, prompts: list[str], references: list[str]) -> float:
    """Token-mean cross-entropy of the references, computed independently of srd_distill."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for pair in encode_pairs(tokenizer, prompts, references, **PROMPT_SETTINGS):
        ids = torch.tensor([pair.prompt_ids + pair.reference_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(pair.prompt_ids) - 1
        targets = torch.tensor(pair.reference_ids)
        total -= float(logprobs[start : start + len(targets)].gather(1, targets[:, None]).sum())
        count += len(targets)
    return total / count


# ----------------------------------------------------------------------------- schedules
def test_presets_and_schedule_files(tmp_path):
    assert [(s.epochs, s.kd_ratio, s.temperature) for s in PRESETS["paper-gpt2"].stages] == [(8, 0.8, 1.0), (8, 0.9, 1.5), (8, 1.0, 2.0)]
    assert [(s.epochs, s.kd_ratio, s.temperature) for s in PRESETS["paper-openllama"].stages] == [(4, 0.7, 1.0), (4, 0.8, 1.33), (4, 0.9, 1.67)]
    assert [(s.kd_ratio, s.temperature) for s in PRESETS["pocl"].stages] == [(0.7, 1.0), (0.8, 1.33), (0.9, 1.67), (1.0, 2.0)]
    assert {s.epochs for s in PRESETS["pocl"].stages} == {8}
    assert [s.epochs for s in with_epochs(PRESETS["pocl"], "1,2,3,4").stages] == [1, 2, 3, 4]
    with pytest.raises(ScheduleError, match="lists 2 values but schedule 'paper-gpt2' has 3 stages"):
        with_epochs(PRESETS["paper-gpt2"], "1,2")

    yaml_file = tmp_path / "two.yaml"
    yaml_file.write_text("epochs: 3\nstages:\n  - {kd_ratio: 0.5, temperature: 1.0}\n  - {kd_ratio: 1.0, temperature: 2.0, epochs: 1}\n")
    schedule = load_schedule(yaml_file)
    assert schedule.name == "two" and [(s.epochs, s.kd_ratio, s.temperature) for s in schedule.stages] == [(3, 0.5, 1.0), (1, 1.0, 2.0)]
    toml_file = tmp_path / "one.toml"
    toml_file.write_text('name = "single"\n[[stages]]\nepochs = 2\nkd_ratio = 0.9\ntemperature = 1.5\n')
    assert load_schedule(toml_file).stages[0].kd_ratio == 0.9

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {kd_ratio: 1.5, temperature: 1.0, epochs: 2}\n  - {kd_ratio: 0.5, temprature: 1.0, epochs: 2}\n")
    with pytest.raises(ScheduleError) as err:
        load_schedule(bad)
    message = str(err.value)
    assert "bad.yaml" in message and "kd_ratio" in message and "less than or equal to 1" in message and "temprature" in message
    with pytest.raises(ScheduleError, match="unknown schedule 'paper-gtp2'.*paper-gpt2"):
        load_schedule("paper-gtp2")


# ----------------------------------------------------------------------------- the shared step
def test_learning_rate_follows_transformers_cosine_schedule():
    # Independent reference: transformers' scheduler. Its warm-up starts at 0 where ours
    # starts at peak / warmup (one step later), so the two agree from the end of warm-up on.
    from transformers import get_cosine_schedule_with_warmup

    from srd_distill.step import learning_rate

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=20)
    reference = []
    for _ in range(20):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [learning_rate(step, 20, 2e-3, warmup_steps=3) for step in range(20)]
    assert ours[3:] == pytest.approx(reference[3:], rel=1e-12)
    assert ours[:3] == pytest.approx([reference[1], reference[2], reference[3]], rel=1e-12)


def test_optimizer_step_is_adamw_with_clipping_and_no_decay_on_gains():
    from srd_distill.step import make_optimizer, optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 4)
    optimizer = make_optimizer(model, 0.1, 0.5, torch.device("cpu"))
    (model(x) ** 2).sum().backward()
    norm = optimizer_step(optimizer, lr=0.05, grad_clip=0.1)
    assert all(p.grad is None for p in model.parameters())

    # The same step written out with torch alone: clip to 0.1, AdamW at lr 0.05, decay on the matrix only.
    (twin(x) ** 2).sum().backward()
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)), rel=1e-6)
    matrices = [p for p in twin.parameters() if p.dim() == 2]
    vectors = [p for p in twin.parameters() if p.dim() < 2]
    torch.optim.AdamW([{"params": matrices, "weight_decay": 0.5}, {"params": vectors, "weight_decay": 0.0}], lr=0.05).step()
    for mine, reference in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(mine, reference, atol=1e-7)


def test_distillation_precision_follows_the_backends_dtype_rule():
    from srd_distill.memory import resolve_precision
    from srdata.backends.hf import resolve_dtype

    for device in ("cpu", "cuda"):
        for dtype in ("auto", "float32", "bfloat16", "float16"):
            assert resolve_precision(device, dtype) == (torch.device(device), resolve_dtype(dtype, torch.device(device)))


def test_docstring_examples_of_the_training_modules():
    import doctest
    import importlib

    for name in ("train", "step", "data", "stages", "run_folder", "checkpoints", "inputs", "resume", "progress"):
        module = importlib.import_module(f"srd_distill.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, name


# ----------------------------------------------------------------------------- training
def test_three_stage_run_checkpoints_metrics_and_eval(models, curriculum, eval_file, tmp_path):
    out = tmp_path / "srd"
    result = train(base(models, curriculum=str(curriculum), output=str(out), epochs=2, eval_file=str(eval_file)), progress=False)
    assert result.complete and [s.stage for s in result.stages] == [0, 1, 2]
    assert [s.rows for s in result.stages] == [5, 10, 15]  # 23 valid rows (1 flagged): parts of 23 // 4 = 5, cumulative

    # Every stage folder loads with from_pretrained and generates.
    for stage in range(3):
        folder = out / f"stage-{stage}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.n_embd == 32 and len(tokenizer) == len(AutoTokenizer.from_pretrained(models["teacher"]))
        info = json.loads((folder / "srd_stage.json").read_text())
        assert info["kept_epoch"] in (0, 1) and 0.0 <= info["best_eval_rouge_l"] <= 1.0
        assert info["started_from"] == (str(models["student"]) if stage == 0 else str(out / f"stage-{stage - 1}"))
    assert not list(out.glob(".stage-*"))

    metrics = read_metrics(out)
    expected = {0: (0.8, 1.0), 1: (0.9, 1.5), 2: (1.0, 2.0)}
    keys = {"event", "stage", "epoch", "step", "loss", "kd_loss", "ce_loss", "lr", "temperature", "kd_ratio", "elapsed"}
    for record in metrics:
        assert keys <= set(record), record
        assert (record["kd_ratio"], record["temperature"]) == expected[record["stage"]]
        assert record["loss"] == pytest.approx((1 - record["kd_ratio"]) * record["ce_loss"] + record["kd_ratio"] * record["kd_loss"], rel=1e-5)
        # The KD term with and without the T^2 factor (t2_scaling "all": T^2 for every loss).
        assert record["t2_factor"] == pytest.approx(record["temperature"] ** 2)
        assert record["kd_loss"] == pytest.approx(record["kd_unscaled"] * record["temperature"] ** 2, rel=1e-9)
    train_rows = [m for m in metrics if m["event"] == "train"]
    assert [sum(m["stage"] == s for m in train_rows) for s in range(3)] == [4, 6, 8]  # ceil(rows/4) steps x 2 epochs
    evals = [m for m in metrics if m["event"] == "eval"]
    assert [(m["stage"], m["epoch"]) for m in evals] == [(s, e) for s in range(3) for e in range(2)]
    assert all(0.0 <= m["eval_rouge_l"] <= 1.0 for m in evals)
    # Fresh cosine schedule per stage: every stage starts at the peak lr and decays.
    for s in range(3):
        lrs = [m["lr"] for m in train_rows if m["stage"] == s]
        assert lrs[0] == pytest.approx(3e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 3e-3 * 0.2
    assert [m["elapsed"] for m in metrics] == sorted(m["elapsed"] for m in metrics)

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["mode"] == "curriculum"
    assert run["schedule"]["name"] == "paper-gpt2" and [s["epochs"] for s in run["schedule"]["stages"]] == [2, 2, 2]
    assert run["encoding"]["max_prompt_tokens"] == 48 and run["encoding"]["source"].endswith("manifest.json")
    assert [s["stage"] for s in run["stages_finished"]] == [0, 1, 2]


def test_baseline_lowers_training_loss(models, scored_run, tmp_path):
    annotated = scored_run / "annotated.parquet"
    frame = pl.read_parquet(annotated).filter(pl.col("invalid_reason").is_null())
    prompts, references = frame["prompt_text"].to_list(), frame["reference_text"].to_list()
    before = reference_ce(models["student"], prompts, references)

    out = tmp_path / "baseline"
    result = train(base(models, data=str(annotated), output=str(out), epochs=6, batch_size=6), progress=False)
    assert [s.stage for s in result.stages] == [0] and result.stages[0].rows == 23  # the flagged row is left out
    after = reference_ce(out / "stage-0", prompts, references)
    assert after < before - 0.5, (before, after)

    metrics = read_metrics(out)
    assert {(m["stage"], m["kd_ratio"], m["temperature"]) for m in metrics} == {(0, 0.8, 1.0)}  # paper-gpt2's first stage
    assert len(metrics) == 6 * 4 and not any(m["event"] == "eval" for m in metrics)
    first_epoch = sum(m["loss"] for m in metrics[:4]) / 4
    last_epoch = sum(m["loss"] for m in metrics[-4:]) / 4
    assert last_epoch < first_epoch
    info = json.loads((out / "stage-0" / "srd_stage.json").read_text())
    assert info["flagged_rows_left_out"] == 1 and info["kept_epoch"] == 5 and info["steps"] == 24
    run = json.loads((out / "run.json").read_text())
    assert run["mode"] == "baseline" and run["encoding"]["max_reference_tokens"] == 24


def test_the_best_epoch_by_eval_rouge_l_is_kept(models, scored_run, eval_file, tmp_path, monkeypatch):
    # Tiny random students score ROUGE-L 0 whatever they do, so the scores are scripted;
    # the weights seen by each evaluation are recorded to compare with the checkpoint.
    scripted = iter([0.10, 0.30, 0.20])
    seen_weights = []
    real_evaluate = train_module.evaluate

    def scripted_evaluate(student, *args, **kwargs):
        scores = real_evaluate(student, *args, **kwargs)
        seen_weights.append({name: t.detach().clone() for name, t in student.state_dict().items()})
        return {**scores, "eval_rouge_l": next(scripted)}

    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate)
    out = tmp_path / "best"
    train(base(models, data=str(scored_run / "annotated.parquet"), output=str(out), epochs=3, eval_file=str(eval_file)), progress=False)

    evals = [m for m in read_metrics(out) if m["event"] == "eval"]
    assert [(m["eval_rouge_l"], m["best"]) for m in evals] == [(0.10, True), (0.30, True), (0.20, False)]
    info = json.loads((out / "stage-0" / "srd_stage.json").read_text())
    assert info["kept_epoch"] == 1 and info["best_eval_rouge_l"] == 0.30
    saved = AutoModelForCausalLM.from_pretrained(out / "stage-0").state_dict()
    assert all(torch.equal(tensor, seen_weights[1][name]) for name, tensor in saved.items())
    assert not all(torch.equal(tensor, seen_weights[2][name]) for name, tensor in saved.items())


def test_resume_continues_after_the_last_finished_stage(models, curriculum, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    settings = base(models, curriculum=str(curriculum), output=str(out), epochs=1)

    first = train({**settings, "stop_after_stage": 0}, progress=False)
    assert not first.complete and (out / "stage-0").is_dir() and not (out / "stage-1").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    stage0_weights = (out / "stage-0" / "model.safetensors").stat().st_mtime_ns

    # Crash in stage 1 just as its checkpoint is being written: a partial folder and
    # stage-1 metrics lines are left behind, as after a kill.
    real_save = train_module.save_checkpoint

    def crash_on_stage_1(model, tokenizer, folder, **kwargs):
        real_save(model, tokenizer, folder, **kwargs)
        if folder.name == ".stage-1.partial":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_on_stage_1)
    with pytest.raises(KeyboardInterrupt):
        train(settings, progress=False)
    assert (out / ".stage-1.partial").is_dir() and not (out / "stage-1").exists()
    assert any(m["stage"] == 1 for m in read_metrics(out))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)

    # Other settings are refused, naming the difference.
    with pytest.raises(RunFolderError, match=r"lr: 0.003 -> 0.001"):
        train({**settings, "lr": 1e-3}, progress=False)

    resumed = train(settings, progress=False)
    assert resumed.complete and [s.skipped for s in resumed.stages] == [True, False, False]
    assert (out / "stage-0" / "model.safetensors").stat().st_mtime_ns == stage0_weights  # stage 0 not redone
    assert (out / "stage-2").is_dir() and not (out / ".stage-1.partial").exists()
    metrics = read_metrics(out)
    assert [sum(m["stage"] == s for m in metrics) for s in range(3)] == [2, 3, 4]  # no stage-1 lines twice
    assert [m["global_step"] for m in metrics] == list(range(1, 10))

    # Same weights as an uninterrupted run: stages are seeded by stage, not by history.
    straight = tmp_path / "straight"
    train({**settings, "output": str(straight)}, progress=False)
    for name, tensor in AutoModelForCausalLM.from_pretrained(straight / "stage-2").state_dict().items():
        assert torch.equal(tensor, AutoModelForCausalLM.from_pretrained(out / "stage-2").state_dict()[name]), name


def test_grad_accum_gives_the_same_step(models, curriculum, tmp_path):
    runs = {}
    for accum in (1, 3):
        out = tmp_path / f"accum-{accum}"
        train(base(models, curriculum=str(curriculum), output=str(out), schedule="paper-gpt2", epochs="1,1,1",
                   max_steps=2, grad_accum=accum), progress=False)
        runs[accum] = AutoModelForCausalLM.from_pretrained(out / "stage-2").state_dict()
    # Adam divides by sqrt(v), so float32 summation-order noise in near-zero gradients can
    # move a few weights by up to ~1e-4 over 6 steps; a wrong token weighting moves most
    # weights by ~lr (3e-3). So: almost every weight equal to 5e-5, none off by lr / 3.
    for name in runs[1]:
        diff = (runs[1][name] - runs[3][name]).abs()
        assert (diff > 5e-5).float().mean() < 1e-3, name
        assert diff.max() < FAST["lr"] / 3, name


def test_every_stage_on_a_cpu_keeps_freed_memory_for_reuse(models, curriculum, tmp_path, monkeypatch):
    # keep_freed_memory's effect (no page faults for repeated large temporaries) is shown in
    # test_distill_bf16.py; here: each training stage on a CPU turns it on before its first step.
    keep, calls = train_module.keep_freed_memory, []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda device: calls.append(device.type) or keep(device))
    train(base(models, curriculum=str(curriculum), output=str(tmp_path / "run"), schedule="paper-gpt2", epochs="1,1,1",
               max_steps=1), progress=False)
    assert calls == ["cpu"] * 3


def test_fused_head_and_gradient_checkpointing_give_the_same_weights(models, curriculum, tmp_path):
    runs, messages = {}, {}
    variants = {"fused": {}, "unfused": {"fused_head": False}, "fused+checkpointing": {"gradient_checkpointing": True}}
    for name, extra in variants.items():
        out = tmp_path / name
        messages[name] = []
        train(base(models, curriculum=str(curriculum), output=str(out), epochs="1,1,1", max_steps=2, **extra),
              progress=False, echo=messages[name].append)
        runs[name] = AutoModelForCausalLM.from_pretrained(out / "stage-2").state_dict()
        stage_info = json.loads((out / "stage-0" / "srd_stage.json").read_text())
        assert stage_info["fused_head"] == (name != "unfused")
    assert any("loss from hidden states (fused LM head)" in m for m in messages["fused"])
    assert any("loss from full logits (--no-fused-head)" in m for m in messages["unfused"])
    assert any("gradient checkpointing" in m for m in messages["fused+checkpointing"])
    # Same criterion as test_grad_accum_gives_the_same_step: float rounding differs, the steps do not.
    for other in ("unfused", "fused+checkpointing"):
        for name in runs["fused"]:
            diff = (runs["fused"][name] - runs[other][name]).abs()
            assert (diff > 5e-5).float().mean() < 1e-3, (other, name)
            assert diff.max() < FAST["lr"] / 3, (other, name)
    # A changed memory lever resumes the same run instead of being refused.
    again = train(base(models, curriculum=str(curriculum), output=str(tmp_path / "fused"), epochs="1,1,1", max_steps=2,
                       fused_head=False, gradient_checkpointing=True), progress=False)
    assert all(stage.skipped for stage in again.stages)


def test_micro_batch_tokens_bound_each_pass_and_give_the_same_step(models, curriculum, tmp_path, monkeypatch):
    passes = []
    real_objective = train_module.batch_objective

    def recording_objective(student, teacher, batch, *args):
        passes.append(tuple(batch.input_ids.shape))
        return real_objective(student, teacher, batch, *args)

    monkeypatch.setattr(train_module, "batch_objective", recording_objective)
    runs = {}
    for cap in (0, 150):
        passes.clear()
        out = tmp_path / f"cap-{cap}"
        train(base(models, curriculum=str(curriculum), output=str(out), epochs="1,1,1", max_steps=2, micro_batch_tokens=cap), progress=False)
        runs[cap] = AutoModelForCausalLM.from_pretrained(out / "stage-2").state_dict()
        if cap == 0:
            assert max(rows for rows, _ in passes) == 4  # one pass per step of batch_size rows (5 rows: 4 + 1)
        else:
            assert all(rows * width <= cap or rows == 1 for rows, width in passes) and max(r for r, _ in passes) < 4, passes
    for name in runs[0]:  # the criterion of test_grad_accum_gives_the_same_step
        diff = (runs[0][name] - runs[150][name]).abs()
        assert (diff > 5e-5).float().mean() < 1e-3, name
        assert diff.max() < FAST["lr"] / 3, name


def test_checkpoints_keep_the_students_dtype(models, scored_run, tmp_path):
    from safetensors import safe_open

    from srd_distill.memory import cpu_has_native_bfloat16

    bf16_student = tmp_path / "student-bf16"
    AutoModelForCausalLM.from_pretrained(models["student"], dtype=torch.bfloat16).save_pretrained(bf16_student)
    AutoTokenizer.from_pretrained(models["student"]).save_pretrained(bf16_student)
    assert json.loads((bf16_student / "config.json").read_text())["dtype"] == "bfloat16"

    saved = {}
    for save_dtype in ("auto", "float32"):
        out = tmp_path / save_dtype
        train(base(models, student=str(bf16_student), teacher=str(bf16_student), data=str(scored_run / "annotated.parquet"),
                   output=str(out), epochs=1, max_steps=2, save_dtype=save_dtype), progress=False)
        with safe_open(out / "stage-0" / "model.safetensors", "pt") as weights:
            saved[save_dtype] = {key: weights.get_tensor(key) for key in weights.keys()}
        config = json.loads((out / "stage-0" / "config.json").read_text())
        run = json.loads((out / "run.json").read_text())
        expected = "bfloat16" if save_dtype == "auto" else "float32"
        assert config["dtype"] == expected and run["save_dtype"] == expected
        assert {t.dtype for t in saved[save_dtype].values()} == {getattr(torch, expected)}
        # The teacher is loaded in its saved dtype where the CPU computes bfloat16 natively.
        assert run["teacher_dtype"] == ("bfloat16" if cpu_has_native_bfloat16() else "float32")
        reloaded = AutoModelForCausalLM.from_pretrained(out / "stage-0")
        assert reloaded.dtype == getattr(torch, expected) and reloaded.lm_head.weight is reloaded.transformer.wte.weight
    # Same training, so the bfloat16 file is the float32 master weights rounded: nothing else changed on the way.
    assert saved["auto"].keys() == saved["float32"].keys()
    for key, tensor in saved["float32"].items():
        assert torch.equal(tensor.to(torch.bfloat16), saved["auto"][key]), key


def test_max_length_is_respected(models, scored_run, tmp_path, monkeypatch):
    widths = []
    real_objective = train_module.batch_objective

    def recording_objective(student, teacher, batch, *args):
        widths.append(batch.input_ids.shape[1])
        return real_objective(student, teacher, batch, *args)

    monkeypatch.setattr(train_module, "batch_objective", recording_objective)
    out = tmp_path / "short"
    train(base(models, data=str(scored_run / "annotated.parquet"), output=str(out), epochs=1, max_length=56), progress=False)
    info = json.loads((out / "stage-0" / "srd_stage.json").read_text())
    assert widths and max(widths) == 56 and info["rows_cut_to_max_length"] > 0

    student = AutoModelForCausalLM.from_pretrained(models["student"])  # 256 positions
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    train_module.check_context(student, teacher, 256)
    with pytest.raises(TrainingSetupError, match=r"257 tokens but the student takes at most 256 positions; pass --max-length 256"):
        train_module.check_context(student, teacher, 257)


# ----------------------------------------------------------------------------- errors
def test_mismatched_tokenizers_are_refused(models, curriculum, tmp_path):
    with pytest.raises(TokenizerMismatchError, match="teacher and student vocabularies differ"):
        train(base(models, student=str(models["other"]), curriculum=str(curriculum), output=str(tmp_path / "x")), progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_missing_curriculum_files_are_named(models, curriculum, tmp_path):
    broken = tmp_path / "curriculum"
    shutil.copytree(curriculum, broken)
    (broken / "stage-1.parquet").unlink()
    with pytest.raises(CurriculumFilesError, match=r"missing stage-1\.parquet"):
        train(base(models, curriculum=str(broken), output=str(tmp_path / "a")), progress=False)
    with pytest.raises(CurriculumFilesError, match=r"missing stage-3\.parquet.*--keep 4"):
        train(base(models, curriculum=str(curriculum), output=str(tmp_path / "b"), schedule="pocl"), progress=False)
    with pytest.raises(CurriculumFilesError, match="does not exist"):
        train(base(models, curriculum=str(tmp_path / "nowhere"), output=str(tmp_path / "c")), progress=False)
    with pytest.raises(TrainingSetupError, match="either curriculum .* or data"):
        train(base(models, output=str(tmp_path / "d")), progress=False)


# ----------------------------------------------------------------------------- CLI
def test_cli_train_and_errors(models, curriculum, scored_run, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(main, ["train", "--help"]).output
    assert "--curriculum" in help_text and "Example: --loss rkl" in help_text and "srd-distill train" in help_text

    out = tmp_path / "cli"
    common = ["--teacher", str(models["teacher"]), "--student", str(models["student"]), "--device", "cpu", "--batch-size", "4"]
    result = runner.invoke(main, ["train", *common, "--curriculum", str(curriculum), "--output", str(out), "--loss", "rkl",
                                  "--epochs", "1", "--max-steps", "1", "--log-every", "1", "--t2-scaling", "reference", "-q"])
    assert result.exit_code == 0, result.output
    assert all((out / f"stage-{s}" / "config.json").is_file() for s in range(3))
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["loss"] == "rkl" and run["settings"]["t2_scaling"] == "reference" and run["settings"]["max_steps"] == 1

    result = runner.invoke(main, ["train", *common, "--data", str(scored_run / "annotated.parquet"), "--output", str(tmp_path / "cli-base"),
                                  "--epochs", "1", "--kd-ratio", "0.5", "--temperature", "2", "--max-steps", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert {(m["kd_ratio"], m["temperature"]) for m in read_metrics(tmp_path / "cli-base")} == {(0.5, 2.0)}

    # Without -q: stage banners, a bar that moves every step, stage ends with memory.
    result = runner.invoke(main, ["train", *common, "--curriculum", str(curriculum), "--output", str(tmp_path / "bar"),
                                  "--epochs", "1", "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "=== stage 0 (1 of 3): 5 rows from stage-0.parquet" in result.output
    assert "kd_ratio 0.9, T 1.5; KD term = D_T x T^2 = D_T x 2.25" in result.output
    assert "=== stage 2 done: 2 steps in" in result.output and "peak RSS" in result.output
    assert "stage 1 (2/3)" in result.output and "tok/s" in result.output and "kd " in result.output and "= D_T " in result.output

    result = runner.invoke(main, ["train", *common, "--curriculum", str(curriculum), "--output", str(tmp_path / "e"), "--schedule", "pocl"])
    assert result.exit_code == 1 and "stage-3.parquet" in result.output
    result = runner.invoke(main, ["train", *common, "--curriculum", str(curriculum), "--output", str(tmp_path / "f"), "--kd-ratio", "0.5"])
    assert result.exit_code == 1 and "kd_ratio and temperature are set per stage" in result.output


def test_ctrl_c_says_that_rerunning_resumes(models, curriculum, tmp_path, monkeypatch):
    real_stage = train_module.train_stage

    def interrupted_in_stage_1(ctx, plan, start_from):
        if plan.index == 1:
            raise KeyboardInterrupt
        return real_stage(ctx, plan, start_from)

    monkeypatch.setattr(train_module, "train_stage", interrupted_in_stage_1)
    out = tmp_path / "ctrl-c"
    args = ["train", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--device", "cpu",
            "--batch-size", "4", "--curriculum", str(curriculum), "--output", str(out), "--epochs", "1", "--max-steps", "1", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert f"interrupted during stage 1; finished stage(s) 0 are saved in {out}" in result.output
    assert "Run the same command again to resume" in result.output and "stage 1 starts again from its beginning" in result.output
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    monkeypatch.setattr(train_module, "train_stage", real_stage)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_srd_distill_train_in_bfloat16_with_micro_batches_tracks_the_float32_loss_curve(models, scored_run, tmp_path):
    # The whole loop (train_stage: weight_cast_scope around two micro-batches a step, AdamW) in bfloat16 against float32.
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train(base(models, data=str(scored_run / "annotated.parquet"), output=str(out), epochs=1, max_steps=3, grad_accum=2,
                   dtype=dtype, teacher_dtype=dtype), progress=False)
        assert json.loads((out / "run.json").read_text())["dtype"] == dtype
        losses[dtype] = [m["loss"] for m in read_metrics(out) if m["event"] == "train"]
    assert len(losses["float32"]) == len(losses["bfloat16"]) == 3
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert abs(a - b) / abs(a) < 2e-2  # bfloat16 rounding, as the one-step bound of test_distill_bf16.py
