"""Loading a curriculum: datasets, the stage sampler, and the Trainer callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from srdata.curriculum.reader import CurriculumSampler, curriculum_training_set, load_curriculum
from srdata.curriculum.export import export_curriculum
from tests._runs import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # 42 rows, 2 invalid -> 40 ranked: 10 rows per part.
    return make_run(tmp_path_factory.mktemp("curriculum") / "run", 42, invalid_ids=[0, 41])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


# --- load_curriculum ---------------------------------------------------------------------


def test_load_curriculum_returns_one_dataset_per_stage(run: Path, cache: str):
    out = export_curriculum(run)
    stages = load_curriculum(out, cache_dir=cache)
    assert list(stages) == ["stage_0", "stage_1", "stage_2"]
    assert [stages[name].num_rows for name in stages] == [10, 20, 30]
    assert set(stages["stage_1"]["stage"]) == {1}
    assert "prompt_text" in stages["stage_0"].column_names
    # The same export is found from its curriculum.json and from the run folder.
    assert load_curriculum(out / "curriculum.json", cache_dir=cache)["stage_2"].num_rows == 30
    assert load_curriculum(run, cache_dir=cache)["stage_0"].num_rows == 10


def test_load_curriculum_jsonl(run: Path, cache: str):
    out = export_curriculum(run, fmt="jsonl", out=run / "jsonl")
    stages = load_curriculum(out, cache_dir=cache)
    assert [stages[name].num_rows for name in stages] == [10, 20, 30]


def test_load_curriculum_errors(run: Path, tmp_path: Path, cache: str):
    with pytest.raises(FileNotFoundError, match="no curriculum.json"):
        load_curriculum(tmp_path, cache_dir=cache)
    out = export_curriculum(run, out=tmp_path / "broken")
    (out / "stage-1.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="stage-1.parquet"):
        load_curriculum(out, cache_dir=cache)


@pytest.mark.parametrize("layout", ["cumulative", "disjoint"])
def test_training_set_and_stage_of_row(run: Path, cache: str, layout: str):
    out = export_curriculum(run, layout=layout, out=run / f"train-{layout}")
    train, stage_of_row = curriculum_training_set(load_curriculum(out, cache_dir=cache))
    assert train.num_rows == 30
    expected = (np.asarray(train["difficulty_rank"]) - 1) // 10
    assert stage_of_row == expected.tolist()


# --- CurriculumSampler -------------------------------------------------------------------

STAGE_OF_ROW = [2, 0, 1, 0, 2, 1, 1, 2, 0, 2]  # rows 1,3,8 | 2,5,6 | 0,4,7,9


def pools(layout: str) -> list[set[int]]:
    rows = np.asarray(STAGE_OF_ROW)
    return [set(np.flatnonzero(rows <= s if layout == "cumulative" else rows == s).tolist()) for s in range(3)]


@pytest.mark.parametrize("layout", ["cumulative", "disjoint"])
def test_sampler_by_epoch_walks_the_stages(layout: str):
    sampler = CurriculumSampler(STAGE_OF_ROW, layout=layout, epochs_per_stage=[1, 2, 1], seed=3)
    drawn = list(sampler)
    sizes = [len(p) for p in pools(layout)]
    assert len(drawn) == len(sampler) == sizes[0] + 2 * sizes[1] + sizes[2]
    start = 0
    for stage, (size, passes) in enumerate(zip(sizes, [1, 2, 1])):
        for p in range(passes):
            chunk = drawn[start : start + size]
            assert sorted(chunk) == sorted(pools(layout)[stage])  # one full pass per epoch
            start += size
        assert all(sampler.stage_at(i) == stage for i in range(start - size * passes, start))


def test_sampler_shuffles_reproducibly():
    first = list(CurriculumSampler(STAGE_OF_ROW, seed=1))
    assert first == list(CurriculumSampler(STAGE_OF_ROW, seed=1))
    assert first != list(CurriculumSampler(STAGE_OF_ROW, seed=2))
    unshuffled = list(CurriculumSampler(STAGE_OF_ROW, shuffle=False))
    assert unshuffled[:3] == [1, 3, 8]
    sampler = CurriculumSampler(STAGE_OF_ROW, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_sampler_by_step_with_padding_free_steps():
    sampler = CurriculumSampler(STAGE_OF_ROW, by="step", steps_per_stage=[2, 1, 3], samples_per_step=4, seed=0)
    drawn = list(sampler)
    assert sampler.stage_lengths == [8, 4, 12] and len(drawn) == 24
    assert set(drawn[:8]) <= pools("cumulative")[0]
    assert set(drawn[8:12]) <= pools("cumulative")[1]
    assert [sampler.stage_of_step(step) for step in range(6)] == [0, 0, 1, 2, 2, 2]


def test_sampler_by_epoch_pads_each_stage_to_whole_steps():
    sampler = CurriculumSampler(STAGE_OF_ROW, samples_per_step=4)
    assert sampler.stage_lengths == [4, 8, 12]  # 3, 6, 10 rows rounded up to steps of 4
    drawn = list(sampler)
    assert set(drawn[:4]) <= pools("cumulative")[0]


def test_sampler_in_a_plain_pytorch_dataloader():
    sampler = CurriculumSampler(STAGE_OF_ROW, samples_per_step=2, seed=0)
    loader = DataLoader(torch.arange(10), sampler=sampler, batch_size=2)
    batches = [batch.tolist() for batch in loader]
    assert len(batches) == len(sampler) // 2
    assert all(set(b) <= pools("cumulative")[sampler.stage_of_step(i)] for i, b in enumerate(batches))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ([[]], {}, "non-empty"),
        ([[0, 2]], {}, r"stages \[1\] have no rows"),
        ([[0, -1]], {}, ">= 0"),
        ([[0, 1]], {"by": "minute"}, "by must be"),
        ([[0, 1]], {"by": "step"}, "needs steps_per_stage"),
        ([[0, 1]], {"epochs_per_stage": [1, 2, 3]}, "3 values for 2 stages"),
        ([[0, 1]], {"epochs_per_stage": 0}, "positive integers"),
        ([[0, 1]], {"samples_per_step": 0}, "at least 1"),
        ([[0, 1]], {"layout": "spiral"}, "unknown layout"),
    ],
)
def test_sampler_rejects_bad_settings(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CurriculumSampler(*args, **kwargs)


# --- transformers.Trainer ----------------------------------------------------------------


def tiny_trainer(train, sampler, callback, tmp_path: Path, seen: list[list[int]], accumulation: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))

    def collate(rows):
        ids = [row["srd_id"] for row in rows]
        seen.append(ids)
        input_ids = torch.tensor([[i % 60 + 1, 2, 3, 4] for i in ids])
        return {"input_ids": input_ids, "labels": input_ids}

    class CurriculumTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        num_train_epochs=1, learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    return CurriculumTrainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[callback])


def test_callback_switches_stage_inside_transformers_trainer(run: Path, cache: str, tmp_path: Path):
    from srdata.curriculum.reader import CurriculumCallback

    train, stage_of_row = curriculum_training_set(load_curriculum(export_curriculum(run), cache_dir=cache))
    sampler = CurriculumSampler(stage_of_row, epochs_per_stage=1, samples_per_step=4, seed=0)
    started: list[int] = []
    callback = CurriculumCallback(sampler, on_stage_start=lambda stage, state: started.append(stage), save_at_stage_end=True)
    seen: list[list[int]] = []
    trainer = tiny_trainer(train, sampler, callback, tmp_path, seen)
    trainer.train()

    # Stages of 10, 20, 30 rows padded to steps of 4: 3, 5 and 8 steps.
    assert trainer.state.global_step == 16
    assert callback.switches == [(0, 0), (3, 1), (8, 2)]
    assert started == [0, 1, 2]
    part_of = dict(zip(train["srd_id"], stage_of_row))
    for step, ids in enumerate(seen):
        assert max(part_of[i] for i in ids) <= sampler.stage_of_step(step)
    assert {part_of[i] for batch in seen[8:] for i in batch} == {0, 1, 2}
    assert sorted(p.name for p in (tmp_path / "trainer").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-8"]


def test_callback_refuses_a_sampler_built_for_other_steps(run: Path, cache: str, tmp_path: Path):
    from srdata.curriculum.reader import CurriculumCallback

    train, stage_of_row = curriculum_training_set(load_curriculum(export_curriculum(run), cache_dir=cache))
    sampler = CurriculumSampler(stage_of_row, samples_per_step=4)
    trainer = tiny_trainer(train, sampler, CurriculumCallback(sampler), tmp_path, [], accumulation=2)
    with pytest.raises(ValueError, match="samples_per_step=8"):
        trainer.train()
