"""Curriculum export: layouts, sizes, thresholds, re-ranking, atomic writes, bad input, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import polars as pl
import pytest
from click.testing import CliRunner

from tests._runs import annotated_frame, make_run
from srdata.cli_curriculum import COMMANDS
from srdata.export import CurriculumError, export_curriculum, plan_stages, rerank_run, stage_bounds
from srdata.rank import RankingError, rank


@pytest.fixture
def run(tmp_path: Path) -> Path:
    # 43 rows, 2 invalid -> 41 ranked rows: floor(41/4) = 10 rows per part, 1 remainder.
    return make_run(tmp_path / "run", 43, invalid_ids=[3, 17])


def stage(out: Path, s: int) -> pl.DataFrame:
    return pl.read_parquet(out / f"stage-{s}.parquet")


def summary(out: Path) -> dict:
    return json.loads((out / "curriculum.json").read_text())


def cli() -> click.Group:
    group = click.Group("srdata")
    for command in COMMANDS:
        group.add_command(command)
    return group


# --- layouts and sizes -------------------------------------------------------------------


def test_default_export_follows_the_paper(run: Path):
    out = export_curriculum(run)
    assert out == run / "curriculum"
    assert sorted(p.name for p in out.iterdir()) == ["curriculum.json", "stage-0.parquet", "stage-1.parquet", "stage-2.parquet"]
    annotated = pl.read_parquet(run / "annotated.parquet")
    for s, size in enumerate([10, 20, 30]):
        rows = stage(out, s)
        assert rows.height == size
        assert rows.columns == [*annotated.columns, "stage"]
        assert rows["stage"].to_list() == [s] * size and rows.schema["stage"] == pl.Int64
        assert sorted(rows["difficulty_rank"].to_list()) == list(range(1, size + 1))
        assert rows["invalid_reason"].null_count() == size
        assert rows["srd_id"].is_sorted()  # input order inside a stage file


def test_stage_rows_are_identical_to_the_annotated_rows(run: Path):
    out = export_curriculum(run)
    annotated = pl.read_parquet(run / "annotated.parquet")
    expected = annotated.filter(pl.col("difficulty_rank") <= 20).with_columns(stage=pl.lit(1, dtype=pl.Int64))
    assert stage(out, 1).equals(expected)


def test_keeping_every_stage_puts_the_remainder_in_the_last(run: Path):
    out = export_curriculum(run, stages=4, keep=4)
    assert [stage(out, s).height for s in range(4)] == [10, 20, 30, 41]
    assert summary(out)["dropped"] == {"rows": 0}


def test_disjoint_layout(run: Path):
    out = export_curriculum(run, layout="disjoint", out=run / "disjoint")
    parts = [stage(out, s) for s in range(3)]
    assert [p.height for p in parts] == [10, 10, 10]
    assert [sorted(p["difficulty_rank"].to_list()) for p in parts] == [list(range(1 + 10 * s, 11 + 10 * s)) for s in range(3)]
    assert [s["new_rows"] for s in summary(out)["stages"]] == [10, 10, 10]


def test_keep_defaults_to_all_but_the_hardest(run: Path):
    out = export_curriculum(run, stages=5)
    assert [s["rows"] for s in summary(out)["stages"]] == [8, 16, 24, 32]


def test_uneven_fractions(run: Path):
    out = export_curriculum(run, fractions=[0.2, 0.5, 0.9])
    assert [s["rows"] for s in summary(out)["stages"]] == [8, 20, 36]  # floor(41 * f)
    assert summary(out)["dropped"]["rows"] == 5
    assert summary(out)["settings"]["fractions"] == [0.2, 0.5, 0.9]


def test_fractions_use_exact_decimal_cuts():
    # 0.29 * 100 is 28.999... in binary floating point; the cut must still be 29 rows.
    assert stage_bounds(100, plan_stages(fractions=[0.29, 1.0])) == [(0, 29), (0, 100)]


def test_jsonl_format_holds_the_same_rows(run: Path):
    out = export_curriculum(run, fmt="jsonl", out=run / "jsonl")
    assert sorted(p.name for p in out.glob("stage-*")) == ["stage-0.jsonl", "stage-1.jsonl", "stage-2.jsonl"]
    rows = pl.read_ndjson(out / "stage-2.jsonl")
    assert rows["srd_id"].to_list() == stage(export_curriculum(run), 2)["srd_id"].to_list()
    assert summary(out)["settings"]["format"] == "jsonl"


# --- curriculum.json ---------------------------------------------------------------------


def test_curriculum_json_records_sizes_thresholds_settings_and_source(run: Path):
    out = export_curriculum(run)
    info = summary(out)
    assert info["source"]["config_hash"] == "cafe1234"
    assert info["source"] | {"run_dir": None} == {
        "run_dir": None, "config_hash": "cafe1234", "run_srdata_version": "0.1.0",
        "annotated_rows": 43, "valid_rows": 41, "invalid_rows": 2,
    }
    assert info["settings"] == {"layout": "cumulative", "stages": 4, "keep": 3, "fractions": [0.25, 0.5, 0.75], "format": "parquet", "compression": "zstd", "compression_level": 1}
    assert info["ranking"] == {"rank_by": "rouge_l:desc,ce_loss:asc", "rrf_k": 60, "ties": "input", "recomputed": False}
    for entry in info["stages"]:
        rows = stage(out, entry["stage"])
        assert entry["rows"] == rows.height and entry["file"] == f"stage-{entry['stage']}.parquet"
        assert entry["thresholds"] == {"max_difficulty_rank": rows["difficulty_rank"].max(), "min_rrf_score": rows["rrf_score"].min()}
        assert entry["scores"]["rouge_l"]["mean"] == pytest.approx(rows["rouge_l"].mean())
        assert entry["scores"]["ce_loss"]["max"] == rows["ce_loss"].max()
    dropped = info["dropped"]
    assert dropped["rows"] == 11 and dropped["difficulty_rank"] == {"min": 31, "max": 41}


# --- ranking options ---------------------------------------------------------------------


def test_ranking_options_rerank_in_memory_without_touching_the_run(run: Path):
    before = (run / "annotated.parquet").read_bytes()
    out = export_curriculum(run, ties="reference", rank_by="rouge_l:desc,ce_loss:asc:2", rrf_k=10, out=run / "custom")
    assert (run / "annotated.parquet").read_bytes() == before
    expected = rank(pl.read_parquet(run / "annotated.parquet"), 10, rank_by="rouge_l:desc,ce_loss:asc:2", ties="reference")
    rows = stage(out, 2)
    assert rows.columns == [*pl.read_parquet(run / "annotated.parquet").columns, "stage"]
    assert rows.drop("stage").equals(expected.filter(pl.col("difficulty_rank") <= 30).select(rows.columns[:-1]))
    assert summary(out)["ranking"] == {"rank_by": "rouge_l:desc,ce_loss:asc:2", "rrf_k": 10, "ties": "reference", "recomputed": True}


def test_rerank_of_a_file_not_in_srd_id_order(tmp_path: Path):
    shuffled = annotated_frame(40, seed=5).sample(fraction=1.0, shuffle=True, seed=1)
    run = make_run(tmp_path / "run", frame=shuffled)
    out = export_curriculum(run, rrf_k=30)
    expected = rank(shuffled, 30).filter(pl.col("difficulty_rank") <= 20).sort("srd_id")
    assert stage(out, 1).drop("stage").sort("srd_id").equals(expected.select(stage(out, 1).columns[:-1]))


def test_rerank_run_rewrites_the_run_and_export_follows_it(run: Path):
    rerank_run(run, rank_by="rouge_l:desc,ce_loss:asc,output_tokens:asc", ties="reference")
    annotated = pl.read_parquet(run / "annotated.parquet")
    expected = rank(annotated.drop("rank_output_tokens"), rank_by="rouge_l:desc,ce_loss:asc,output_tokens:asc", ties="reference")
    assert annotated.select(expected.columns).equals(expected)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ranking"]["ties"] == "reference" and manifest["config_hash"] == "cafe1234"
    info = summary(export_curriculum(run))
    assert info["ranking"] == {"rank_by": "rouge_l:desc,ce_loss:asc,output_tokens:asc", "rrf_k": 60, "ties": "reference", "recomputed": False}
    rerank_run(run)  # back to the default: the custom rank column must not linger
    assert "rank_output_tokens" not in pl.read_parquet_schema(run / "annotated.parquet")
    assert not list(run.glob(".tmp-*"))


def test_export_records_the_rrf_k_the_run_was_scored_with(tmp_path: Path):
    run = make_run(tmp_path / "run", 20)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["metrics"]["rrf_k"] = 10
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert summary(export_curriculum(run))["ranking"]["rrf_k"] == 10


# --- files -------------------------------------------------------------------------------


def test_reexport_removes_stale_stage_files(run: Path):
    out = export_curriculum(run, stages=4, keep=4)
    export_curriculum(run, stages=4, keep=2)
    assert sorted(p.name for p in out.iterdir()) == ["curriculum.json", "stage-0.parquet", "stage-1.parquet"]


def test_failed_write_leaves_previous_export_intact(run: Path, monkeypatch):
    out = export_curriculum(run)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_sink = pl.LazyFrame.sink_parquet
    calls = []

    def sink_then_fail(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # stage 0 is already written to its temporary file
            raise OSError("disk full")
        return real_sink(self, path, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", sink_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_curriculum(run, rrf_k=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either


# --- bad input ---------------------------------------------------------------------------


def test_unfinished_run_names_the_missing_shards(tmp_path: Path):
    run = make_run(tmp_path / "run", 40, status="running", shards_done=[True, False, True, False])
    with pytest.raises(CurriculumError, match=r"2 of 4 shards are missing: shards/shard-00001\.parquet \(rows 10-19\), shards/shard-00003\.parquet \(rows 30-39\)"):
        export_curriculum(run)


def test_missing_run_manifest_or_annotated(tmp_path: Path):
    with pytest.raises(CurriculumError, match="does not exist"):
        export_curriculum(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurriculumError, match="manifest.json missing"):
        export_curriculum(tmp_path / "empty")
    run = make_run(tmp_path / "run", 20)
    (run / "annotated.parquet").unlink()
    with pytest.raises(CurriculumError, match="annotated.parquet is missing"):
        export_curriculum(run)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stages": 4, "keep": 5}, "larger than --stages"),
        ({"stages": 0}, "positive integer"),
        ({"keep": 0}, "positive integer"),
        ({"fractions": [0.5, 0.25]}, "strictly increasing"),
        ({"fractions": [0.5, 0.5]}, "strictly increasing"),
        ({"fractions": [0.0, 0.5]}, r"in \(0, 1\]"),
        ({"fractions": [0.5, 1.5]}, r"in \(0, 1\]"),
        ({"fractions": [-0.2]}, r"in \(0, 1\]"),
        ({"fractions": []}, "empty"),
        ({"fractions": [0.5], "stages": 4}, "either --stages or --fractions"),
        ({"fractions": [0.5, 1.0], "keep": 3}, "disagrees"),
        ({"layout": "spiral"}, "unknown layout"),
        ({"fmt": "csv"}, "unknown format"),
    ],
)
def test_bad_settings(run: Path, options: dict, message: str):
    with pytest.raises(CurriculumError, match=message):
        export_curriculum(run, **options)


def test_fewer_rows_than_stages(tmp_path: Path):
    run = make_run(tmp_path / "run", 5, invalid_ids=[0, 1])
    with pytest.raises(CurriculumError, match="only 3 rankable rows, fewer than the 4 stages"):
        export_curriculum(run)
    with pytest.raises(CurriculumError, match="stage 0 of --fractions would be empty"):
        export_curriculum(run, fractions=[0.1, 1.0])


def test_nan_scores_are_refused(tmp_path: Path):
    frame = annotated_frame(20).with_columns(
        rouge_l=pl.when(pl.col("srd_id").is_in([4, 11])).then(float("nan")).otherwise(pl.col("rouge_l"))
    )
    run = make_run(tmp_path / "run", frame=frame)
    with pytest.raises(RankingError, match=r"'rouge_l' has NaN scores \(2 rows\) at srd_id 4, 11"):
        export_curriculum(run)
    with pytest.raises(RankingError, match="srd_id 4, 11"):
        export_curriculum(run, ties="reference")


def test_rank_by_column_that_does_not_exist(run: Path):
    with pytest.raises(RankingError, match=r"'length' does not exist in the run; numeric columns: prompt_tokens"):
        export_curriculum(run, rank_by="rouge_l:desc,length:asc")


def test_output_folder_not_writable(run: Path, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CurriculumError, match="is not writable"):
        export_curriculum(run, out=blocker / "curriculum")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_output_folder_without_write_permission(run: Path, tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(CurriculumError, match="is not writable"):
        export_curriculum(run, out=locked)


# --- CLI ---------------------------------------------------------------------------------


def test_cli_export_and_rank(run: Path):
    runner = CliRunner()
    result = runner.invoke(cli(), ["export", str(run), "--stages", "4", "--keep", "3"])
    assert result.exit_code == 0, result.output
    assert "stage-0.parquet: 10 rows (difficulty_rank <= 10" in result.output
    assert "dropped: 11 hardest rows; invalid: 2 rows" in result.output
    result = runner.invoke(cli(), ["export", str(run), "--fractions", "0.5,1", "--layout", "disjoint", "--format", "jsonl", "--out", str(run / "x")])
    assert result.exit_code == 0, result.output
    assert (run / "x" / "stage-1.jsonl").is_file()
    result = runner.invoke(cli(), ["rank", str(run), "--ties", "reference", "--rrf-k", "30"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "manifest.json").read_text())["ranking"]["rrf_k"] == 30


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--keep", "5"], 2, "--keep 5 is larger than --stages 4"),
        (["--fractions", "0.5,0.2"], 2, "strictly increasing"),
        (["--fractions", "half"], 2, "comma-separated numbers"),
        (["--rank-by", "rouge_l:sideways"], 2, "bad direction"),
        (["--rrf-k", "-3"], 2, "--rrf-k must be >= 0"),
        (["--rank-by", "nope:asc"], 1, "'nope' does not exist"),
    ],
)
def test_cli_export_errors_are_messages_not_tracebacks(run: Path, args, code, message):
    result = CliRunner().invoke(cli(), ["export", str(run), *args])
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_cli_errors_for_unusable_runs(tmp_path: Path):
    unfinished = make_run(tmp_path / "run", 20, status="running", shards_done=[True, False])
    for command in (["export", str(unfinished)], ["rank", str(unfinished)]):
        result = CliRunner().invoke(cli(), command)
        assert result.exit_code == 1 and "shard-00001.parquet" in result.output
    result = CliRunner().invoke(cli(), ["export", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_cli_help_has_examples():
    for name in ("export", "rank", "report", "inspect"):
        result = CliRunner().invoke(cli(), [name, "--help"])
        assert result.exit_code == 0 and f"srdata {name} runs/dolly" in result.output
