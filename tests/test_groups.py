"""Groups across curriculum stages: the share check (--by), its warnings, and the stratified cut (--stratify).

Checked on the testbed (four task families; a student that already does one of them) and on
real T0 templates, always against counts taken from the stage files that were written.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import click
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from srdata.cli import export_cmd, inspect_cmd, rank_cmd, report_cmd
from srdata.curriculum.reader import curriculum_training_set, load_curriculum
from srdata.curriculum.export import CurriculumError, export_curriculum
from srdata.curriculum.groups import (
    STRATIFIED_COLUMN,
    GroupShareWarning,
    ShareCheck,
    curriculum_parts,
    group_shares,
    stratified_ranks,
)
from srdata.steps.rank import rank
from srdata.curriculum.report import build_report, inspect_run
from srdata.steps.rouge import rouge_l
from srdata.demo.testbed import generate_pairs, inject_noise
from tests._runs import make_run


def cli() -> click.Group:
    group = click.Group("srdata")
    for command in (export_cmd, rank_cmd, report_cmd, inspect_cmd):
        group.add_command(command)
    return group


def scored_frame(prompts: list[str], references: list[str], outputs: list[str], extra: dict[str, list], ce_offset: list[float]) -> pl.DataFrame:
    """A frame like annotated.parquet: real ROUGE-L of ``outputs``, a loss that follows it, ranks by srdata.steps.rank."""
    rouge = rouge_l(outputs, references)
    n = len(prompts)
    frame = pl.DataFrame({
        "prompt": prompts,
        "response": references,
        **extra,
        "srd_id": np.arange(n, dtype=np.int64),
        "prompt_text": prompts,
        "reference_text": references,
        "student_output": outputs,
        "rouge_l": [float(r) for r in rouge],
        "ce_loss": [3.0 * (1.0 - r) + c for r, c in zip(rouge, ce_offset)],
        "invalid_reason": pl.Series([None] * n, dtype=pl.String),
    })
    return rank(frame)


def scored_testbed(n: int = 800, seed: int = 0) -> pl.DataFrame:
    """Testbed pairs scored as by a student that copies its input: right on copy, partly on sort,
    mostly wrong on reverse and shift (the testbed's student could already do one family, sort)."""
    rows = inject_noise(generate_pairs(n, seed=seed), 0.1, seed=seed + 1)
    outputs = [r["prompt"].split(" ", 1)[1].strip() for r in rows]
    extra = {"task": [r["task"] for r in rows], "difficulty": [r["difficulty"] for r in rows], "is_noisy": [r["is_noisy"] for r in rows]}
    return scored_frame([r["prompt"] for r in rows], [r["response"] for r in rows], outputs, extra, [0.1 * r["difficulty"] for r in rows])


@pytest.fixture(scope="module")
def testbed_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("groups") / "testbed", frame=scored_testbed(), shard_size=200)


def stage_files(out: Path) -> list[pl.DataFrame]:
    summary = json.loads((out / "curriculum.json").read_text())
    return [pl.read_parquet(out / s["file"]) for s in summary["stages"]]


def counts(frame: pl.DataFrame, column: str) -> Counter:
    return Counter(frame[column].to_list())


# --- the stratified order ----------------------------------------------------------------


def check_prefix_shares(positions: np.ndarray, groups: np.ndarray) -> float:
    """Largest |rows of a group in the first e positions - its share x e| over every prefix e and group."""
    order = np.argsort(positions)
    codes = np.unique(groups, return_inverse=True)[1]
    sizes = np.bincount(codes)
    placed = np.zeros((len(order) + 1, len(sizes)))
    placed[np.arange(1, len(order) + 1), codes[order]] = 1
    placed = placed.cumsum(axis=0)
    fair = np.arange(len(order) + 1)[:, None] * sizes[None, :] / len(order)
    return float(np.abs(placed - fair).max())


@pytest.mark.parametrize("sizes", [
    [250, 250, 250, 250],
    [1000] + [1] * 100,          # one large group and many single rows: the hard case for quotas
    [500, 120, 37, 9, 3, 2, 1, 1],
    [7, 7, 7, 13, 13, 200, 2],
])
def test_every_prefix_of_the_stratified_order_holds_each_group_within_one_row(sizes: list[int]):
    rng = np.random.default_rng(len(sizes))
    groups = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    difficulty = rng.permutation(len(groups)) + 1
    positions = stratified_ranks(pl.Series(difficulty), pl.Series(groups)).to_numpy()
    assert sorted(positions.tolist()) == list(range(1, len(groups) + 1))
    assert check_prefix_shares(positions, groups) < 1.0
    # Inside a group the order is the difficulty order.
    for g in range(len(sizes)):
        mine = groups == g
        assert np.array_equal(np.argsort(positions[mine]), np.argsort(difficulty[mine]))


def test_stratified_order_leaves_unranked_rows_out_and_groups_nulls_together():
    difficulty = pl.Series([4, None, 1, 3, None, 2, 5, 6], dtype=pl.Int64)
    groups = pl.Series(["a", "a", None, "a", None, None, "b", None])
    positions = stratified_ranks(difficulty, groups)
    assert positions.null_count() == 2 and positions[1] is None and positions[4] is None
    ranked = positions.drop_nulls().to_numpy()
    assert sorted(ranked.tolist()) == list(range(1, 7))
    kept = difficulty.is_not_null().to_numpy()
    labels = np.array(["null" if g is None else g for g in groups.to_list()])[kept]
    assert check_prefix_shares(positions.to_numpy()[kept], labels) < 1.0


def test_stratified_order_refuses_repeated_ranks():
    with pytest.raises(ValueError, match="difficulty ranks repeat"):
        stratified_ranks(pl.Series([1, 1, 2]), pl.Series(["a", "b", "a"]))


# --- share table and thresholds ----------------------------------------------------------


def test_share_table_numbers_and_flags():
    # 100 ranked rows: a = 60 rows, all in the easiest 40; b = 40 rows, the hardest.
    positions = pl.Series(range(1, 101))
    groups = pl.Series(["a"] * 60 + ["b"] * 40)
    parts = curriculum_parts([(0, 25), (0, 50), (0, 75)], 100)
    result = group_shares(positions, groups, parts, "src", ShareCheck(2.0, 40))
    a, b = result["table"]
    assert (a["value"], a["rows"], a["share"]) == ("a", 60, 0.6)
    assert a["parts"]["stage 0"] == {"rows": 25, "share": 1.0, "ratio": pytest.approx(1 / 0.6), "flagged": False}
    assert b["parts"]["stage 0"] == {"rows": 0, "share": 0.0, "ratio": 0.0, "flagged": True}
    assert b["parts"]["stage 1"]["rows"] == 0 and b["parts"]["stage 1"]["flagged"]
    assert b["parts"]["stage 2"]["share"] == pytest.approx(15 / 75) and b["parts"]["stage 2"]["flagged"] is False  # 0.5x: not below
    assert a["parts"]["dropped"] == {"rows": 0, "share": 0.0, "ratio": 0.0, "flagged": True}
    assert b["parts"]["dropped"]["share"] == 1.0 and b["parts"]["dropped"]["flagged"] is True  # 2.5x
    assert len(result["warnings"]) == 4
    assert "stage 0 is 0% src='b' (0 of its 40 rows) against 40% of all ranked rows: 0.00x its share" in result["warnings"]
    # A looser ratio flags fewer; groups under min_rows are never flagged.
    assert [w for w in group_shares(positions, groups, parts, "src", ShareCheck(3.0, 40))["warnings"]] == [
        w for w in result["warnings"] if "0.00x" in w]
    assert group_shares(positions, groups, parts, "src", ShareCheck(2.0, 61))["warnings"] == []


@pytest.mark.parametrize("ratio, rows, message", [(1.0, 40, "--max-share-ratio"), (0.5, 40, "--max-share-ratio"), (2.0, 0, "--min-group-rows")])
def test_bad_share_settings(testbed_run: Path, ratio: float, rows: int, message: str):
    with pytest.raises(CurriculumError, match=message):
        export_curriculum(testbed_run, by="task", max_share_ratio=ratio, min_group_rows=rows, out=testbed_run / "bad")


def test_a_random_ranking_rarely_warns_and_small_groups_never():
    rng = np.random.default_rng(7)
    positions = pl.Series(rng.permutation(2400) + 1)
    parts = curriculum_parts([(0, 600), (0, 1200), (0, 1800)], 2400)
    of_40 = group_shares(positions, pl.Series(np.repeat(np.arange(60), 40)), parts, "g")
    # 60 groups x 4 parts under chance: about 2 flags expected (1.6% per group in each quarter part).
    assert len(of_40["warnings"]) <= 5
    of_10 = pl.Series(np.repeat(np.arange(240), 10))
    assert group_shares(positions, of_10, parts, "g")["warnings"] == []
    assert len(group_shares(positions, of_10, parts, "g", ShareCheck(2.0, 1))["warnings"]) > 40  # what the minimum prevents


# --- the testbed -------------------------------------------------------------------------


def test_export_by_task_on_the_testbed_warns_where_the_files_say(testbed_run: Path, tmp_path: Path):
    with pytest.warns(GroupShareWarning) as caught:
        out = export_curriculum(testbed_run, by="task", out=tmp_path / "by-task")
    summary = json.loads((out / "curriculum.json").read_text())
    (result,) = summary["groups"]
    assert result["column"] == "task" and result["max_share_ratio"] == 2.0 and result["min_group_rows"] == 40
    annotated = pl.read_parquet(testbed_run / "annotated.parquet")
    overall = counts(annotated, "task")
    dropped = annotated.filter(pl.col("difficulty_rank") > 600)
    files = stage_files(out)
    for entry in result["table"]:
        task = entry["value"]
        assert entry["rows"] == overall[task] and entry["share"] == pytest.approx(overall[task] / 800)
        for s, rows in enumerate(files):
            assert entry["parts"][f"stage {s}"]["rows"] == counts(rows, "task")[task]
        assert entry["parts"]["dropped"]["rows"] == counts(dropped, "task")[task]
    # The copy-the-input student finds copy easy and shift hard: stage 0 floods with copy, the dropped part with shift.
    shares = {e["value"]: e for e in result["table"]}
    assert shares["copy"]["parts"]["stage 0"]["ratio"] > 2 and shares["copy"]["parts"]["stage 0"]["flagged"]
    assert shares["shift"]["parts"]["dropped"]["ratio"] > 2 and shares["shift"]["parts"]["dropped"]["flagged"]
    assert summary["warnings"] == result["warnings"] and len(result["warnings"]) >= 4
    assert [str(w.message) for w in caught] == summary["warnings"]
    assert any(w.startswith("the dropped part is ") and "task='shift'" in w for w in summary["warnings"])


def test_stratified_export_on_the_testbed_keeps_every_share(testbed_run: Path, tmp_path: Path):
    plain = export_curriculum(testbed_run, out=tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupShareWarning)  # a stratified cut must not warn
        out = export_curriculum(testbed_run, stratify="task", out=tmp_path / "stratified")
    summary = json.loads((out / "curriculum.json").read_text())
    assert summary["settings"]["stratify"] == "task" and summary["warnings"] == []
    assert [s["rows"] for s in summary["stages"]] == [s.height for s in stage_files(plain)] == [200, 400, 600]
    annotated = pl.read_parquet(testbed_run / "annotated.parquet")
    overall = counts(annotated, "task")
    files = stage_files(out)
    for s, rows in enumerate(files):
        assert rows[STRATIFIED_COLUMN].sort().to_list() == list(range(1, rows.height + 1))
        assert summary["stages"][s]["thresholds"] == {"max_stratified_rank": rows.height}
        for task, n in overall.items():
            assert abs(counts(rows, "task")[task] - n * rows.height / 800) < 1
            # Each task's rows in the stage are that task's easiest.
            mine = annotated.filter(pl.col("task") == task).sort("difficulty_rank")
            assert set(rows.filter(pl.col("task") == task)["srd_id"]) == set(mine["srd_id"].head(counts(rows, "task")[task]))
    # The training set puts every row in the first stage that holds it.
    train, stage_of_row = curriculum_training_set(load_curriculum(out, cache_dir=str(tmp_path / "hf")))
    first_stage = {}
    for s, rows in reversed(list(enumerate(files))):
        first_stage.update(dict.fromkeys(rows["srd_id"].to_list(), s))
    assert stage_of_row == [first_stage[i] for i in train["srd_id"]]
    # The same rows as JSON lines, and the disjoint layout keeps shares within two rows.
    jsonl = export_curriculum(testbed_run, stratify="task", fmt="jsonl", out=tmp_path / "jsonl")
    assert pl.read_ndjson(jsonl / "stage-1.jsonl")["srd_id"].to_list() == files[1]["srd_id"].to_list()
    disjoint = export_curriculum(testbed_run, stratify="task", layout="disjoint", out=tmp_path / "disjoint")
    for rows in stage_files(disjoint):
        assert all(abs(counts(rows, "task")[t] - n * rows.height / 800) < 2 for t, n in overall.items())


def test_report_of_a_stratified_export(testbed_run: Path, tmp_path: Path):
    export_curriculum(testbed_run, stratify="task", out=tmp_path / "stratified")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupShareWarning)
        report = build_report(testbed_run, out=tmp_path / "report", by=["task"], curriculum=tmp_path / "stratified")
    text = (report / "report.md").read_text()
    assert "stratified by task" in text and "| stage | rows | new rows | stratified ranks |" in text
    assert "| stage 0 | 200 | 200 | 1-200 |" in text and "| dropped | 200 | 200 | 601-800 |" in text
    assert "No task is far from its share in any stage or in the dropped part." in text
    groups = json.loads((report / "groups.json").read_text())["groups"]
    assert groups[0]["warnings"] == [] and all(abs(e["parts"]["dropped"]["share"] - 0.25) < 0.01 for e in groups[0]["table"])


def test_report_and_inspect_follow_the_default_stratified_export(tmp_path: Path):
    run = make_run(tmp_path / "run", frame=scored_testbed(200, seed=3), shard_size=100)
    export_curriculum(run, stratify="task")
    text = inspect_run(run)
    assert "stratified by task" in text
    assert "stage 0        50 rows  stratified 1-50 " in text


# --- real T0 templates -------------------------------------------------------------------


@pytest.fixture(scope="module")
def t0_run(shared_data_dir: Path, tmp_path_factory) -> Path:
    """2,400 real T0 rows (12 templates x 200) scored as by a student that answers every prompt of a
    template with that template's most common reference: right on label-like templates, wrong on the
    open-ended ones."""
    path = shared_data_dir / "t0-train.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    t0 = pl.read_parquet(path).filter(pl.col("response").str.strip_chars() != "")
    full = t0.group_by("template").len().filter(pl.col("len") >= 200)["template"].sort().to_list()
    chosen = full[:: max(1, len(full) // 12)][:12]
    rows = pl.concat([t0.filter(pl.col("template") == t).head(200) for t in chosen])
    majority = rows.group_by("template").agg(pl.col("response").mode().sort().first().alias("guess"))
    rows = rows.join(majority, on="template", how="left", maintain_order="left")
    frame = scored_frame(rows["prompt"].to_list(), rows["response"].to_list(), rows["guess"].to_list(),
                         {"template": rows["template"].to_list()}, [0.0] * rows.height)
    return make_run(tmp_path_factory.mktemp("t0") / "run", frame=frame, shard_size=600)


def test_t0_templates_warn_and_stratify(t0_run: Path, tmp_path: Path):
    with pytest.warns(GroupShareWarning):
        out = export_curriculum(t0_run, by="template", out=tmp_path / "by")
    summary = json.loads((out / "curriculum.json").read_text())
    (result,) = summary["groups"]
    assert result["groups"] == 12 and all(entry["rows"] == 200 for entry in result["table"])
    dropped_share = {e["value"]: e["parts"]["dropped"]["share"] for e in result["table"]}
    annotated = pl.read_parquet(t0_run / "annotated.parquet")
    dropped = counts(annotated.filter(pl.col("difficulty_rank") > 1800), "template")
    assert dropped_share == pytest.approx({t: dropped[t] / 600 for t in dropped_share})
    assert any(w.startswith("the dropped part is ") for w in result["warnings"])

    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupShareWarning)
        stratified = export_curriculum(t0_run, by="template", stratify="template", out=tmp_path / "stratified")
    files = stage_files(stratified)
    assert [f.height for f in files] == [600, 1200, 1800]
    for rows in files:
        assert set(counts(rows, "template").values()) == {rows.height // 12}  # 200 rows of each of 12: exactly even
    with pytest.warns(GroupShareWarning):
        report = build_report(t0_run, out=tmp_path / "report", by=["template"], curriculum=tmp_path / "by")
    text = (report / "report.md").read_text()
    assert "share of dropped" in text and " !" in text and "Warning: the dropped part is" in text


# --- bad input and the command line ------------------------------------------------------


def test_grouping_columns_that_cannot_be_used(testbed_run: Path, tmp_path: Path):
    with pytest.raises(CurriculumError, match=r"--by column 'topic' does not exist in the run; columns: .*task"):
        export_curriculum(testbed_run, by="topic", out=tmp_path / "x")
    with pytest.raises(CurriculumError, match="--stratify column 'topic' does not exist"):
        export_curriculum(testbed_run, stratify="topic", out=tmp_path / "x")
    with pytest.raises(CurriculumError, match="--by column 'nope' does not exist"):
        build_report(testbed_run, by=["nope"], out=tmp_path / "r")
    frame = scored_testbed(80).with_columns(pl.col("task").map_elements(lambda t: [t], return_dtype=pl.List(pl.String)).alias("tags"))
    run = make_run(tmp_path / "nested", frame=frame)
    with pytest.raises(CurriculumError, match=r"'tags' holds List\(String\) values; group by a column of plain values"):
        export_curriculum(run, by="tags")


def test_null_group_values_form_their_own_group(tmp_path: Path):
    frame = scored_testbed(200, seed=2).with_columns(
        pl.when(pl.col("task") == "sort").then(None).otherwise(pl.col("task")).alias("task"))
    run = make_run(tmp_path / "run", frame=frame, shard_size=100)
    out = export_curriculum(run, stratify="task")
    summary = json.loads((out / "curriculum.json").read_text())
    values = {e["value"]: e["rows"] for e in summary["groups"][0]["table"]}
    assert values == dict(counts(frame, "task")) and set(values) == {None, "copy", "reverse", "shift"}
    assert abs(stage_files(out)[0]["task"].null_count() - values[None] * 50 / 200) < 1


def test_cli_export_prints_the_table_and_warns_on_stderr(testbed_run: Path, tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(cli(), ["export", str(testbed_run), "--by", "task", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "share of each task (! = warned):" in result.stdout and "'shift'" in result.stdout
    assert "warning: the dropped part is" in result.stderr and "--stratify task" in result.stderr
    assert "warning" not in result.stdout
    summary = json.loads((tmp_path / "cli" / "curriculum.json").read_text())
    assert result.stderr.count("warning: ") == len(summary["warnings"])

    result = runner.invoke(cli(), ["export", str(testbed_run), "--stratify", "task", "--out", str(tmp_path / "strat")])
    assert result.exit_code == 0, result.output
    assert "stratified_rank <= 200: the easiest 25% of every task" in result.stdout and result.stderr == ""

    result = runner.invoke(cli(), ["export", str(testbed_run), "--by", "task", "--max-share-ratio", "1"])
    assert result.exit_code == 2 and "--max-share-ratio must be a number above 1" in result.output
    result = runner.invoke(cli(), ["export", str(testbed_run), "--stratify", "topic"])
    assert result.exit_code == 1 and "'topic' does not exist" in result.output and "Traceback" not in result.output


def test_cli_report_by_warns_on_stderr(testbed_run: Path, tmp_path: Path):
    result = CliRunner().invoke(cli(), ["report", str(testbed_run), "--by", "task", "--curriculum", str(export_curriculum(testbed_run, out=tmp_path / "c")),
                                        "--out", str(tmp_path / "report"), "--max-share-ratio", "3"])
    assert result.exit_code == 0, result.output
    groups = json.loads((tmp_path / "report" / "groups.json").read_text())
    assert groups["max_share_ratio"] == 3.0 and groups["groups"][0]["warnings"]
    assert result.stderr.count("warning: ") == len(groups["groups"][0]["warnings"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "more than 3x or less than 1/3 of the group's share" in text
    assert "| task | ranked rows | share of all | share of stage 0 | share of stage 1 | share of stage 2 | share of dropped |" in text
