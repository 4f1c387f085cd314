"""srd-distill's typed records (issue 26 item 5): one name for the kept epoch, records an older version wrote still
read, a stage's record returned by ``train_stage``; the renamed names keep a deprecation path (items 7, 8)."""

from __future__ import annotations

import json
import warnings

import pytest

from srd_distill.checkpoints import seal_checkpoint
from srd_distill.errors import TrainingInterrupted
from srd_distill.records import RunRecord, StageRecord, StepState
from srd_distill.train import train

from .test_safety_distill import models, one_thread, settings  # noqa: F401  (fixtures: tiny teacher and student)
from .test_train import curriculum, eval_file, scored_run  # noqa: F401  (module fixtures: a real export)


def test_an_older_step_checkpoint_that_says_best_epoch_resumes_with_the_same_kept_epoch(models, curriculum, eval_file,
                                                                                        tmp_path, monkeypatch):
    import srd_distill.train as train_module

    out = tmp_path / "run"
    # Stage 0: 5 rows in steps of 2, 2 epochs = 6 steps; stopped after the step checkpoint of step 4 (in epoch 1,
    # after epoch 0's evaluation chose the weights kept so far).
    run = settings(models, curriculum=str(curriculum), output=str(out), epochs=2, batch_size=2, checkpoint_interval=2,
                   eval_file=str(eval_file), stop_after_stage=0)
    real_save = train_module.save_step_checkpoint

    def ctrl_c_after_step_4(run_dir, stage, position, **kwargs):
        folder = real_save(run_dir, stage, position, **kwargs)
        if position.step == 4:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(train_module, "save_step_checkpoint", ctrl_c_after_step_4)
    with pytest.raises(TrainingInterrupted):
        train(run, progress=False)
    monkeypatch.setattr(train_module, "save_step_checkpoint", real_save)

    step = out / ".stage-0.step-4"
    state = json.loads((step / "state.json").read_text())
    assert state["kept_epoch"] == 0 and "best_epoch" not in state  # one name, as srd_stage.json has it
    # As the srd-distill before this name wrote it, sealed as it sealed it.
    state["best_epoch"] = state.pop("kept_epoch")
    (step / "state.json").write_text(json.dumps(state))
    seal_checkpoint(step)

    messages: list[str] = []
    result = train(run, progress=False, echo=messages.append)
    assert any("resumed after step 4" in m for m in messages), messages
    straight = tmp_path / "straight"
    want = train({**run, "output": str(straight), "checkpoint_interval": 0}, progress=False)
    got_info = json.loads((out / "stage-0" / "srd_stage.json").read_text())
    want_info = json.loads((straight / "stage-0" / "srd_stage.json").read_text())
    drop = ("seconds", "started_from")
    assert {k: v for k, v in got_info.items() if k not in drop} == {k: v for k, v in want_info.items() if k not in drop}
    assert got_info["kept_epoch"] == want.stages[0].kept_epoch == result.stages[0].kept_epoch

    # train_stage's record is what srd_stage.json and run.json's stages_finished hold.
    assert result.stages[0].record.to_json() == got_info
    assert json.loads((out / "run.json").read_text())["stages_finished"] == [got_info]
    with pytest.warns(DeprecationWarning, match="kept_epoch"):
        assert result.stages[0].best_epoch == got_info["kept_epoch"]
    import srd_distill.run_folder as run_folder

    with pytest.warns(DeprecationWarning, match="read_stage_record"):
        assert run_folder.read_stage_info(out, 0) == got_info


def test_records_read_old_names_and_keep_unknown_keys():
    old = StageRecord.model_validate({"stage": 1, "rows": 10, "steps": 4, "seconds": 2.0, "best_epoch": 3, "from_a_newer": "x"})
    assert old.kept_epoch == 3 and old.to_json() == {"stage": 1, "rows": 10, "steps": 4, "kept_epoch": 3, "seconds": 2.0,
                                                     "from_a_newer": "x"}
    both = StepState.model_validate({"stage": 0, "best_epoch": 1, "kept_epoch": 2})
    assert both.kept_epoch == 2  # today's name wins
    record = RunRecord.model_validate({"tool": "srd-distill", "format_version": 2, "stages_finished": [old.to_json()]})
    assert record.stages_finished[0].kept_epoch == 3 and record.to_json()["stages_finished"][0]["kept_epoch"] == 3
    with pytest.raises(ValueError):
        RunRecord.model_validate({"settings": "not a dict"})


def test_renamed_names_keep_a_deprecation_path():
    import srd_distill.stages as stages
    import srd_distill.testbed_models as testbed
    import srd_distill.train as train_module
    from srd_distill.data import Example

    with pytest.warns(DeprecationWarning, match="srd_distill.stages.TrainingStage"):
        assert stages.StagePlan is stages.TrainingStage
    with pytest.warns(DeprecationWarning, match="srd_distill.stages.plan_training"):
        assert stages.plan_stages is stages.plan_training
    with pytest.warns(DeprecationWarning, match="srd_distill.stages.TrainingStage"):
        assert train_module.StagePlan is stages.TrainingStage
    with pytest.warns(DeprecationWarning, match="srd_distill.data.Example"):
        assert train_module.Example is Example
    with pytest.warns(DeprecationWarning, match="TinyModelRecipe"):
        assert testbed.ModelConfig is testbed.TinyModelRecipe
    with pytest.warns(DeprecationWarning, match="teacher_recipe"):
        assert testbed.TeacherConfig(steps=3) == testbed.teacher_recipe(steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the names train.py uses itself are its own, no warning
        assert train_module.train_stage and train_module.evaluate
    with pytest.raises(AttributeError):
        train_module.no_such_name  # noqa: B018
    # srdata's export keeps its own stage plan (how rows are cut), distinct from srd-distill's stages to train.
    from srdata.curriculum.cut import StagePlan, plan_stages

    assert plan_stages(4, 3) == StagePlan("cumulative", 4, 3, None)


def test_srd_distill_reads_a_curriculum_through_srdatas_reader(tmp_path):
    from srd_distill.data import checked_curriculum
    from srd_distill.errors import CurriculumFilesError
    from srdata.curriculum.export import export_curriculum
    from srdata.curriculum.reader import MissingStageFilesError, verified_curriculum
    from tests._runs import make_run

    out = export_curriculum(make_run(tmp_path / "run"))
    verified = verified_curriculum(out)
    files, digests = checked_curriculum(out, len(verified.files), "paper-gpt2")
    assert (files, digests) == (verified.files, verified.sha256)
    verified.files[1].unlink()
    with pytest.raises(MissingStageFilesError) as missing:
        verified_curriculum(out)
    assert missing.value.files == verified.files and isinstance(missing.value, FileNotFoundError)
    with pytest.raises(CurriculumFilesError, match=rf"is missing {verified.files[1].name} \(listed in"):
        checked_curriculum(out, len(verified.files), "paper-gpt2")
