"""The controlled testbed: task generators, difficulty knob, noise injection, splits, tokenizer."""

from __future__ import annotations

import random

import polars as pl
import pytest

from srdata.demo.testbed import (
    LEVELS,
    TASKS,
    TestbedSpec,
    build_testbed,
    char_tokenizer,
    format_ranking_summary,
    generate_pairs,
    inject_noise,
    make_pair,
    ranking_summary,
    read_jsonl,
    save_char_tokenizer,
)


def _items(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize("task", TASKS + ("add",))
def test_responses_are_correct_for_every_task_and_level(task):
    rng = random.Random(7)
    for level in LEVELS:
        for _ in range(20):
            prompt, response = make_pair(task, level, rng)
            assert prompt.startswith(task + " ") and prompt.endswith("\n")
            words = prompt.split()
            if task == "copy":
                assert _items(response) == words[1:] and len(words[1:]) == level + 2
            elif task == "reverse":
                assert _items(response) == words[1:][::-1]
            elif task == "sort":
                assert _items(response) == sorted(words[1:]) and len(words[1:]) == level + 2
            elif task == "shift":
                assert [chr((ord(c) - 97 + 1) % 26 + 97) for c in words[1:]] == _items(response)
                assert len(words[1:]) == level + 2
            elif task == "add":  # numbers written least significant digit first
                plus = words.index("+")
                a, b = int("".join(words[1:plus])[::-1]), int(words[plus + 1])
                assert len(words[1:plus]) == level + 1 and len(words[plus + 1 :]) == 1
                assert "".join(_items(response))[::-1] == str(a + b)


def test_difficulty_knob_makes_inputs_longer():
    rng = random.Random(0)
    for task in TASKS:
        lengths = [sum(len(make_pair(task, level, rng)[0]) for _ in range(30)) / 30 for level in LEVELS]
        assert lengths == sorted(lengths) and lengths[-1] > lengths[0], task


def test_generation_is_balanced_and_deterministic():
    rows = generate_pairs(160, seed=3)
    assert rows == generate_pairs(160, seed=3)
    assert rows != generate_pairs(160, seed=4)
    cells = pl.DataFrame(rows).group_by("task", "difficulty").len()
    assert cells.height == len(TASKS) * len(LEVELS) and set(cells["len"].to_list()) == {10}
    assert not any(r["is_noisy"] for r in rows) and all(r["response"] == r["clean_response"] for r in rows)
    assert [r["pair_id"] for r in generate_pairs(5, seed=0, id_offset=100)] == [100, 101, 102, 103, 104]


def test_noise_hits_the_exact_fraction_with_wrong_responses():
    rows = generate_pairs(500, seed=1)
    noisy = inject_noise(rows, 0.10, seed=2)
    flagged = [r for r in noisy if r["is_noisy"]]
    assert len(flagged) == 50
    assert all(r["response"] != r["clean_response"] for r in flagged)
    assert all(r["response"] == r["clean_response"] for r in noisy if not r["is_noisy"])
    assert noisy == inject_noise(rows, 0.10, seed=2)  # deterministic
    assert not any(r["is_noisy"] for r in rows)  # input untouched
    with pytest.raises(ValueError):
        inject_noise(rows, 1.0, seed=0)


def test_build_testbed_writes_clean_eval_splits(tmp_path):
    spec = TestbedSpec(train_pairs=300, dev_pairs=40, test_pairs=60, teacher_pairs=100, warmup_pairs=50, seed=5)
    files = build_testbed(tmp_path / "tb", spec)
    train, dev, test = read_jsonl(files.train), read_jsonl(files.dev), read_jsonl(files.test)
    assert (len(train), len(dev), len(test)) == (300, 40, 60)
    assert files.counts["train_noisy"] == 30 == sum(r["is_noisy"] for r in train)
    assert not any(r["is_noisy"] for r in dev + test + read_jsonl(files.teacher_sft) + read_jsonl(files.warmup))
    ids = [r["pair_id"] for r in train + dev + test]
    assert len(ids) == len(set(ids))
    assert set(train[0]) >= {"prompt", "response", "task", "difficulty", "is_noisy", "clean_response"}
    again = build_testbed(tmp_path / "tb2", spec)
    assert again.train.read_text() == files.train.read_text()


def test_srdata_detects_the_prompt_response_layout(tmp_path):
    from srdata.steps.dataset import load_split, resolve_columns

    files = build_testbed(tmp_path / "tb", TestbedSpec(train_pairs=20, dev_pairs=0, test_pairs=0, teacher_pairs=0, warmup_pairs=0))
    dataset = load_split(str(files.train))
    mapping = resolve_columns(dataset.column_names, None, None, None)
    assert (mapping.prompt_column, mapping.response_column) == ("prompt", "response")


def test_char_tokenizer_roundtrip_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.get_vocab() == char_tokenizer().get_vocab()
    rng = random.Random(0)
    for task in TASKS:
        prompt, response = make_pair(task, 4, rng)
        ids = tok(prompt + response, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(prompt + response)  # one token per character
        assert tok.decode(ids) == prompt + response
    assert tok("a", add_special_tokens=True)["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # no BOS
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok.decode(tok("é")["input_ids"], skip_special_tokens=True) == ""  # unknown character -> <unk>


def _annotated(n: int = 400, noisy_last: bool = True) -> pl.DataFrame:
    """A fake scored testbed run: ranks follow the level, noisy rows ranked hardest."""
    from srdata.steps.rank import rank

    rows = inject_noise(generate_pairs(n, seed=0), 0.1, seed=1)
    frame = pl.DataFrame(rows).with_columns(pl.int_range(pl.len()).alias("srd_id"))
    noise = pl.col("is_noisy").cast(pl.Float64) * (5.0 if noisy_last else 0.0)
    frame = frame.with_columns(
        (1.0 - pl.col("difficulty") / 5.0 - noise / 5.0 + (pl.col("srd_id") % 7) / 1000).alias("rouge_l"),
        (pl.col("difficulty").cast(pl.Float64) + noise + (pl.col("srd_id") % 5) / 1000).alias("ce_loss"),
    )
    return rank(frame)


def test_ranking_summary_measures_noise_and_difficulty():
    summary = ranking_summary(_annotated())
    assert summary["rows"] == 400 and summary["noisy_rows"] == 40
    assert summary["kept_rows"] == 300 and summary["dropped_rows"] == 100
    for column in ("difficulty_rank", "rank_rouge_l", "rank_ce_loss"):
        assert summary["by_ranking"][column]["noisy_recall"] == 1.0
        assert summary["by_ranking"][column]["noisy_precision"] == pytest.approx(0.4)
    assert summary["rank_agreement"] > 0.9
    assert summary["difficulty_rank_vs_level_clean_rows"] > 0.8
    ranks = [summary["by_difficulty"][str(level)]["mean_difficulty_rank"] for level in LEVELS]
    assert ranks == sorted(ranks)
    text = format_ranking_summary(summary)
    assert "40 of 40 noisy pairs dropped (100%)" in text and "Spearman(rank, level)" in text


def test_ranking_summary_at_chance_when_noise_is_invisible():
    summary = ranking_summary(_annotated(noisy_last=False))
    assert summary["by_ranking"]["difficulty_rank"]["noisy_recall"] < 0.6


def test_count_and_extract_responses_are_correct():
    from srdata.demo.regimes import COUNT_LETTERS

    rng = random.Random(5)
    for level in LEVELS:
        for _ in range(30):
            prompt, response = make_pair("count", level, rng)
            words = prompt.split()
            assert words[0] == "count" and words[2] == ":" and len(words[3:]) == level + 3
            assert set(words[3:]) <= set(COUNT_LETTERS) and response == str(words[3:].count(words[1]))
            prompt, response = make_pair("extract", level, rng)
            words = prompt.split()
            k, letters = int(words[1]), words[3:]
            assert len(letters) == level + 3 and 1 <= k <= len(letters) and response == letters[k - 1]


def test_regimes_set_tasks_and_noise_and_leave_todays_files_unchanged(tmp_path):
    from srdata.demo.regimes import HARD_TASKS, REGIMES

    spec = TestbedSpec(train_pairs=280, dev_pairs=28, test_pairs=56, teacher_pairs=56, warmup_pairs=28, seed=2)
    today = build_testbed(tmp_path / "today", spec)
    teachable = build_testbed(tmp_path / "teachable", spec, regime="teachable")
    for name in ("train", "dev", "test", "teacher_sft", "warmup"):  # the default spec is the teachable regime, byte for byte
        assert getattr(today, name).read_bytes() == getattr(teachable, name).read_bytes()
    paper = build_testbed(tmp_path / "paper", spec, regime="paper")
    train = read_jsonl(paper.train)
    assert sum(r["is_noisy"] for r in train) == round(REGIMES["paper"]["noise_fraction"] * 280) == 56
    assert {r["task"] for r in train} == set(TASKS) | set(HARD_TASKS)
    counts = pl.DataFrame(read_jsonl(paper.test)).group_by("task", "difficulty").len()
    assert counts.height == 7 * len(LEVELS) and set(counts["len"].to_list()) == {2}
    assert {r["task"] for r in read_jsonl(paper.teacher_sft)} == set(TASKS) | set(HARD_TASKS)
    import json

    record = json.loads(paper.spec_file.read_text())
    assert record["regime"] == "paper" and set(record["tasks"]) >= {"count", "extract", "add"}
    with pytest.raises(ValueError, match="unknown testbed regime 'dolly'; use one of teachable, paper"):
        build_testbed(tmp_path / "x", spec, regime="dolly")
