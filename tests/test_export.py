"""Curriculum export: layouts, sizes, thresholds, re-ranking, atomic writes, bad input, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests._runs import annotated_frame, make_run
from srdata.cli import export_cmd, inspect_cmd, rank_cmd, report_cmd
from srdata.curriculum.export import CurriculumError, export_curriculum, plan_stages, rerank_run, stage_bounds, write_stages
from srdata.run.io import LOCK_FILE
from srdata.steps.rank import RankingError, rank


@pytest.fixture
def run(tmp_path: Path) -> Path:
    # 43 rows, 2 invalid -> 41 ranked rows: floor(41/4) = 10 rows per part, 1 remainder.
    return make_run(tmp_path / "run", 43, invalid_ids=[3, 17])


def stage(out: Path, s: int) -> pl.DataFrame:
    return pl.read_parquet(out / f"stage-{s}.parquet")


def in_stage_order(frame: pl.DataFrame, ends: list[int]) -> pl.DataFrame:
    """The rows of a cumulative stage as export writes them: part by part (easiest first),
    input order inside each part."""
    starts = [0, *ends[:-1]]
    return pl.concat([frame.filter(pl.col("difficulty_rank").is_between(a + 1, b)) for a, b in zip(starts, ends)])


def listing(out: Path) -> list[str]:
    """The files of a folder, but the lock file every command leaves in the folder it writes."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)


def summary(out: Path) -> dict:
    return json.loads((out / "curriculum.json").read_text())


def cli() -> click.Group:
    group = click.Group("srdata")
    for command in (export_cmd, rank_cmd, report_cmd, inspect_cmd):
        group.add_command(command)
    return group


# --- layouts and sizes -------------------------------------------------------------------


def test_default_export_follows_the_paper(run: Path):
    out = export_curriculum(run)
    assert out == run / "curriculum"
    assert listing(out) == ["curriculum.json", "stage-0.parquet", "stage-1.parquet", "stage-2.parquet"]
    annotated = pl.read_parquet(run / "annotated.parquet")
    for s, size in enumerate([10, 20, 30]):
        rows = stage(out, s)
        assert rows.height == size
        assert rows.columns == [*annotated.columns, "stage"]
        assert rows["stage"].to_list() == [s] * size and rows.schema["stage"] == pl.Int64
        assert sorted(rows["difficulty_rank"].to_list()) == list(range(1, size + 1))
        assert rows["invalid_reason"].null_count() == size
        # Part by part, easiest first, input order inside a part: stage s-1 is the head of stage s.
        assert rows.drop("stage").equals(in_stage_order(annotated, [10, 20, 30][: s + 1]))
        assert rows.head(10 * s).drop("stage").equals(stage(out, max(s - 1, 0)).head(10 * s).drop("stage"))


def test_stage_rows_are_identical_to_the_annotated_rows(run: Path):
    out = export_curriculum(run)
    annotated = pl.read_parquet(run / "annotated.parquet")
    expected = in_stage_order(annotated, [10, 20]).with_columns(stage=pl.lit(1, dtype=pl.Int64))
    assert stage(out, 1).equals(expected)
    assert pq.read_table(out / "stage-1.parquet").equals(expected.to_arrow())  # any reader, same rows


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
    parquet = export_curriculum(run)
    for s in range(3):
        rows = pl.read_ndjson(out / f"stage-{s}.jsonl")
        expected = stage(parquet, s)
        assert rows.columns == expected.columns
        assert rows.select("srd_id", "stage", "difficulty_rank", "prompt_text").equals(expected.select("srd_id", "stage", "difficulty_rank", "prompt_text"))
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
    assert info["settings"] == {"layout": "cumulative", "stages": 4, "keep": 3, "fractions": [0.25, 0.5, 0.75], "format": "parquet", "compression": "zstd", "compression_level": 1, "stratify": None}
    assert info["ranking"] == {"rank_by": "rouge_l:desc,ce_loss:asc", "rrf_k": 60, "ties": "input", "recomputed": False}
    for entry in info["stages"]:
        rows = stage(out, entry["stage"])
        assert entry["rows"] == rows.height and entry["file"] == f"stage-{entry['stage']}.parquet"
        assert entry["thresholds"] == {"max_difficulty_rank": rows["difficulty_rank"].max(), "min_rrf_score": rows["rrf_score"].min()}
        assert entry["scores"]["rouge_l"]["mean"] == pytest.approx(rows["rouge_l"].mean())
        assert entry["scores"]["ce_loss"]["max"] == rows["ce_loss"].max()
    dropped = info["dropped"]
    assert dropped["rows"] == 11 and dropped["difficulty_rank"] == {"min": 31, "max": 41}
    assert info["groups"] == [] and info["warnings"] == []  # no --by: no group check


# --- ranking options ---------------------------------------------------------------------


def test_ranking_options_rerank_in_memory_without_touching_the_run(run: Path):
    before = (run / "annotated.parquet").read_bytes()
    out = export_curriculum(run, ties="reference", rank_by="rouge_l:desc,ce_loss:asc:2", rrf_k=10, out=run / "custom")
    assert (run / "annotated.parquet").read_bytes() == before
    expected = rank(pl.read_parquet(run / "annotated.parquet"), 10, rank_by="rouge_l:desc,ce_loss:asc:2", ties="reference")
    rows = stage(out, 2)
    assert rows.columns == [*pl.read_parquet(run / "annotated.parquet").columns, "stage"]
    assert rows.drop("stage").equals(in_stage_order(expected, [10, 20, 30]).select(rows.columns[:-1]))
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
    export_curriculum(run, stages=4, keep=2, overwrite=True)
    assert listing(out) == ["curriculum.json", "stage-0.parquet", "stage-1.parquet"]


def test_failed_write_leaves_previous_export_intact(run: Path, monkeypatch):
    out = export_curriculum(run)
    before = {name: (out / name).read_bytes() for name in listing(out)}
    real_write = pq.ParquetWriter.write_table
    calls = []

    def write_then_fail(self, table, *args, **kwargs):
        calls.append(table.num_rows)
        if len(calls) == 2:  # another segment is already written: fail in a writer thread
            raise OSError("disk full")
        return real_write(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_curriculum(run, rrf_k=5, overwrite=True)
    assert {name: (out / name).read_bytes() for name in listing(out)} == before  # no temporary file left either


@pytest.mark.parametrize("where", ["reading", "assembling", "encoding"])
def test_failure_while_reading_or_assembling_removes_temporary_files(run: Path, monkeypatch, where: str):
    import pyarrow as pa

    def fail(*args, **kwargs):
        raise RuntimeError(f"boom while {where}")

    if where == "reading":  # the rows, split into their parts' scratch files
        monkeypatch.setattr(pa.ipc.RecordBatchStreamWriter, "write_table", fail)
    elif where == "assembling":  # a stage's parts, read back on a writer thread
        monkeypatch.setattr(pa.ipc, "open_stream", fail)
    else:  # a stage file's row groups, on a writer thread
        monkeypatch.setattr(pq.ParquetWriter, "write_table", fail)
    with pytest.raises(RuntimeError, match=f"boom while {where}"):
        export_curriculum(run, out=run / "failed")
    assert listing(run / "failed") == []


def test_export_does_not_import_pandas(run: Path):
    # pyarrow imports pandas the first time some array constructors run: 0.4-0.8 s added
    # to every `srdata export`, for nothing. Checked in a fresh interpreter.
    import subprocess
    import sys

    code = (
        "import sys; from srdata.curriculum.export import export_curriculum; "
        f"export_curriculum({str(run)!r}, rrf_k=5); export_curriculum({str(run)!r}, fmt='jsonl', out={str(run / 'jsonl')!r}); "
        "print('pandas' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_many_row_groups_are_copied_into_the_stage_files(tmp_path: Path, monkeypatch):
    import srdata.curriculum.export as export

    frame = annotated_frame(3000, seed=2, invalid_ids=[5, 700, 2999])
    run = make_run(tmp_path / "run", frame=frame)
    pq.write_table(frame.to_arrow(), run / "annotated.parquet", row_group_size=128)  # many input row groups
    monkeypatch.setattr(export, "ROW_GROUP_BYTES", 16 << 10)  # and many output row groups
    out = export_curriculum(run)
    ends = [749, 1498, 2247]  # floor(2997 / 4) * (s + 1)
    for s in range(3):
        rows = stage(out, s)
        assert pq.ParquetFile(out / f"stage-{s}.parquet").metadata.num_row_groups > 3
        assert rows.drop("stage").equals(in_stage_order(frame, ends[: s + 1]))
        assert rows["stage"].to_list() == [s] * ends[s]
        assert pq.read_table(out / f"stage-{s}.parquet").equals(rows.to_arrow())
    lazy = pl.scan_parquet(out / "stage-2.parquet").filter(pl.col("srd_id") >= 2000).select("srd_id", "stage").collect()
    assert lazy.equals(stage(out, 2).filter(pl.col("srd_id") >= 2000).select("srd_id", "stage"))


def test_stage_files_are_read_by_every_reader(run: Path):
    out = export_curriculum(run)
    for s in range(3):
        path = out / f"stage-{s}.parquet"
        by_pyarrow = pl.from_arrow(pq.read_table(path))
        assert by_pyarrow.equals(pl.read_parquet(path)) and by_pyarrow.equals(pl.scan_parquet(path).collect())
        assert set(by_pyarrow["stage"]) == {s}


def test_nested_categorical_and_null_columns_survive_the_copy(tmp_path: Path, monkeypatch):
    # Parquet has one column chunk per leaf: a struct column shifts the `stage` chunk's position.
    import srdata.curriculum.export as export

    n = 600
    frame = rank(
        pl.DataFrame({
            "srd_id": range(n),
            "template": pl.Series([("alpaca", "raw", "chat")[i % 3] for i in range(n)], dtype=pl.Categorical),
            "tokens": [[i, i + 1] if i % 7 else None for i in range(n)],
            "meta": [{"x": i, "y": str(i)} for i in range(n)],
            "nothing": [None] * n,
            # Integer columns are delta bit-packed: nulls, narrow and unsigned extremes too.
            "small": pl.Series([None if i % 5 == 0 else (i % 256) - 128 for i in range(n)], dtype=pl.Int8),
            "big": pl.Series([0 if i % 2 else 2**64 - 1 - i for i in range(n)], dtype=pl.UInt64),
            "rouge_l": [round((i * 37 % 101) / 100, 2) for i in range(n)],
            "ce_loss": [(i * 53 % 97) / 10 for i in range(n)],
        })
    )
    monkeypatch.setattr(export, "ROW_GROUP_BYTES", 4 << 10)
    files = write_stages(frame.lazy(), [(0, 150), (0, 300), (0, 450)], tmp_path, "parquet")
    for s, path in enumerate(files):
        expected = in_stage_order(frame, [150, 300, 450][: s + 1]).with_columns(stage=pl.lit(s, dtype=pl.Int64))
        assert pl.read_parquet(path).equals(expected)
        assert pl.from_arrow(pq.read_table(path)).equals(expected)


def test_stage_files_declare_the_rows_arrow_types_not_the_views_they_are_encoded_from(tmp_path: Path):
    # Strings and binaries are encoded from zero-copy views; the footers must still declare
    # what a plain polars -> Arrow conversion gives, for a moved stage and an assembled one.
    import datasets

    n = 60
    frame = rank(pl.DataFrame({
        "srd_id": range(n),
        "prompt": [f"prompt {i} " * (i % 5 + 1) for i in range(n)],
        "blob": [bytes([i % 256]) * (i % 4) for i in range(n)],
        "rouge_l": [(i * 37 % 61) / 60 for i in range(n)],
        "ce_loss": [(i * 53 % 59) / 10 for i in range(n)],
    }))
    files = write_stages(frame.lazy(), [(0, 20), (0, 40)], tmp_path, "parquet")
    declared = frame.with_columns(stage=pl.lit(0, dtype=pl.Int64)).to_arrow().schema
    assert declared.field("prompt").type == "large_string"
    for s, path in enumerate(files):
        assert pq.read_schema(path).equals(declared), path.name
        assert pq.read_table(path).column("blob").to_pylist() == in_stage_order(frame, [20, 40][: s + 1])["blob"].to_list()
        loaded = datasets.Dataset.from_parquet(str(path))
        assert loaded.features["prompt"] == datasets.Value("large_string") and loaded.num_rows == 20 * (s + 1)
        # Integer columns are delta bit-packed (ranks barely compress otherwise), the rest as before.
        group = pq.ParquetFile(path).metadata.row_group(0)
        encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
        for column in ("srd_id", "rank_rouge_l", "rank_ce_loss", "difficulty_rank", "stage"):
            assert "DELTA_BINARY_PACKED" in encodings[column], (column, encodings[column])
        assert "DELTA_BINARY_PACKED" not in encodings["prompt"] + encodings["rrf_score"]


def test_write_stages_with_empty_stages_gaps_and_a_stale_stage_column(tmp_path: Path):
    frame = annotated_frame(20).with_columns(stage=pl.lit("stale"))
    bounds = [(0, 0), (0, 5), (10, 15), (18, 30), (0, 15)]
    files = write_stages(frame.lazy(), bounds, tmp_path, "parquet")
    for s, (start, stop) in enumerate(bounds):
        rows = pl.read_parquet(files[s])
        assert rows.columns == [*frame.columns[:-1], "stage"] and rows.schema["stage"] == pl.Int64
        assert sorted(rows["difficulty_rank"].to_list()) == list(range(start + 1, min(stop, 20) + 1))
        assert rows["stage"].to_list() == [s] * rows.height
    assert pl.read_parquet(files[4])["difficulty_rank"].to_list() == pl.read_parquet(files[1])["difficulty_rank"].to_list() + [
        r for r in frame["difficulty_rank"].to_list() if 5 < r <= 10] + pl.read_parquet(files[2])["difficulty_rank"].to_list()
    (tmp_path / "jsonl").mkdir()
    jsonl = write_stages(frame.lazy(), bounds, tmp_path / "jsonl", "jsonl")
    assert jsonl[0].read_text() == ""
    for s in range(1, len(bounds)):
        lines = pl.read_ndjson(jsonl[s])
        assert lines["srd_id"].to_list() == pl.read_parquet(files[s])["srd_id"].to_list() and set(lines["stage"]) == {s}
    assert not list(tmp_path.glob(".tmp-*")) and not list((tmp_path / "jsonl").glob(".tmp-*"))


def test_fast_stable_sort_matches_a_stable_polars_sort():
    # srdata.steps.order.stable_order packs the value's top bits with the position; values that
    # differ only in the dropped bits, -0.0 and 0.0, extremes and integers must still sort exactly.
    from srdata.steps.order import stable_order

    rng = np.random.default_rng(3)
    cases = [
        [0.0, -0.0, 0.0, -0.0, -1e-300],
        [1.0 + i * 2.0**-52 for i in rng.integers(0, 8, 500)],
        [np.finfo(np.float64).max, -np.finfo(np.float64).max, np.inf, -np.inf, 5e-324] * 40,
        rng.integers(-5, 5, 300).tolist(),
        rng.integers(-(2**63), 2**63 - 1, 300).tolist(),
        np.round(rng.random(5000) * 3, 5).tolist(),
        np.round(rng.random(20000), 2).tolist(),  # many ties, distinct top bits: the n_unique shortcut
        (np.round(rng.random(20000), 1) + rng.integers(0, 3, 20000) * 2.0**-50).tolist(),  # many ties, some sharing top bits
        (np.round(rng.standard_normal(20000), 1) * (1 + rng.integers(0, 3, 20000) * 2.0**-50)).tolist(),  # the same, negatives too
        (lambda base: np.concatenate([base, base[:200] * (1 + 2.0**-51), base[200:300]]))(rng.standard_normal(2800)).tolist(),  # few ties, sharing top bits
        pl.Series(rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True)),
    ]
    for values in cases:
        series = pl.Series(values)
        for descending in (False, True):
            expected = pl.DataFrame({"v": series}).select(pl.arg_sort_by("v", descending=descending, maintain_order=True)).to_series()
            assert stable_order(series, descending).tolist() == expected.to_list()


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
