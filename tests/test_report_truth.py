"""The report describes the export that exists; every file says which ranking its rank columns come from;
a re-export with other settings does not replace an earlier one in silence; small groups' fate is shown.

Runs are synthetic ``srdata score`` folders (tests/_runs.py) with the ``--signals ifd`` columns
filled, exported and reported through the real command line (click's runner, in process).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from srdata.curriculum.export import CurriculumError, export_curriculum
from srdata.curriculum.report import build_report, inspect_run
from srdata.steps.rank import rank
from tests._cli import invoke
from tests._runs import annotated_frame, make_run

NOISY = "ifd:asc:2,ce_loss:asc,pmi:desc"
PAPER = "rouge_l:desc,ce_loss:asc"
COLUMNS = ("rouge_l", "ce_loss", "ifd", "pmi")


def with_signals(frame: pl.DataFrame, seed: int = 1) -> pl.DataFrame:
    """``ifd`` and ``pmi`` as `srdata score --signals ifd` fills them: independent of ROUGE-L, so the noisy cut differs."""
    rng = np.random.default_rng(seed)
    valid = frame["invalid_reason"].is_null().to_numpy()
    ifd = np.round(rng.uniform(0.3, 1.2, frame.height), 4)
    pmi = np.round(rng.normal(0.5, 0.4, frame.height), 4)
    return frame.with_columns(
        pl.Series("ifd", [float(v) if ok else None for v, ok in zip(ifd, valid)]),
        pl.Series("pmi", [float(v) if ok else None for v, ok in zip(pmi, valid)]),
    )


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", frame=with_signals(annotated_frame(80, invalid_ids=[3, 17])))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_after_rank_by_noisy_equals_the_stage_files(run: Path, tmp_path: Path):
    out = tmp_path / "noisy"
    result = invoke("export", run, "--rank-by", "noisy", "--out", out)
    assert result.exit_code == 0, result.output
    assert "ranking: noisy (ifd:asc:2,ce_loss:asc,pmi:desc" in result.output and "re-ranked in memory" in result.output
    stages = [pl.read_parquet(out / f"stage-{s}.parquet") for s in range(3)]
    annotated = pl.read_parquet(run / "annotated.parquet")
    # The cut must differ from the paper's, or this test could not tell the two apart.
    paper_first = set(annotated.sort("difficulty_rank").head(stages[0].height)["srd_id"])
    assert set(stages[0]["srd_id"]) != paper_first

    report = build_report(run, out=tmp_path / "report", curriculum=out)
    text = (report / "report.md").read_text()
    assert "Ranking: noisy (ifd:asc:2,ce_loss:asc,pmi:desc, rrf_k 60, ties input); computed by the export" in text
    header = table_row(text, "stage")
    assert header[4:] == [f"mean {c}" for c in COLUMNS]
    kept = stages[-1]
    dropped = annotated.filter(pl.col("invalid_reason").is_null() & ~pl.col("srd_id").is_in(kept["srd_id"].to_list()))
    # Every number of the stage table, recomputed from the stage files themselves.
    for s, stage in enumerate(stages):
        new = stage.height - (stages[s - 1].height if s else 0)
        ranks = f"{stage['difficulty_rank'].min()}-{stage['difficulty_rank'].max()}"
        expected = [f"stage {s}", str(stage.height), str(new), ranks, *(fmt(stage[c].mean()) for c in COLUMNS)]
        assert table_row(text, f"stage {s}") == expected
    assert table_row(text, "dropped")[:2] == ["dropped", str(dropped.height)]
    assert table_row(text, "dropped")[4:] == [fmt(dropped[c].mean()) for c in COLUMNS]
    # Score table and figures of the ranking used: ifd and pmi too, over the ranked rows.
    ranked = pl.concat([kept, dropped], how="diagonal_relaxed")
    for column in COLUMNS:
        assert table_row(text, column)[1] == fmt(ranked[column].mean())
    with Image.open(report / "score_histograms.png") as image:
        assert image.size == (1000, 800)  # four panels, two rows
    assert "![ifd against ce_loss, coloured by stage](scores_by_stage.png)" in text
    # The easiest row shown is stage 0's easiest under the export's ranking, not annotated.parquet's.
    easiest = kept.filter(pl.col("difficulty_rank") == 1)["srd_id"].item()
    assert f"| 1 | {easiest} |" in text

    # inspect (default export folder): the same numbers.
    assert invoke("export", run, "--rank-by", "noisy").exit_code == 0
    shown = inspect_run(run, examples=1)
    assert "Ranking: noisy" in shown
    for s, stage in enumerate(stages):
        assert re.search(rf"stage {s}\s+{stage.height} rows .* mean ifd {fmt(stage['ifd'].mean())}  mean pmi {fmt(stage['pmi'].mean())}", shown)


def test_every_file_says_which_ranking_its_rank_columns_come_from(run: Path, tmp_path: Path):
    out = export_curriculum(run, rank_by="noisy", out=tmp_path / "noisy")
    summary = json.loads((out / "curriculum.json").read_text())
    assert summary["ranking"] == {"rank_by": NOISY, "rrf_k": 60, "ties": "input", "recomputed": True}
    assert summary["rank_columns"]["stage_files"] == {"rank_by": NOISY, "name": "noisy", "rrf_k": 60, "ties": "input"}
    assert summary["rank_columns"]["annotated_parquet"] == {"rank_by": PAPER, "name": "paper", "rrf_k": 60, "ties": "input"}
    for s in range(3):
        recorded = json.loads(pq.read_metadata(out / f"stage-{s}.parquet").metadata[b"srdata.ranking"])
        assert (recorded["name"], recorded["rank_by"]) == ("noisy", NOISY)
    assert invoke("rank", run, "--rank-by", "noisy").exit_code == 0  # srdata rank says it in annotated.parquet too
    recorded = json.loads(pq.read_metadata(run / "annotated.parquet").metadata[b"srdata.ranking"])
    assert (recorded["name"], recorded["rank_by"]) == ("noisy", NOISY)
    paper = export_curriculum(run, rank_by="paper", out=tmp_path / "paper")
    assert json.loads((paper / "curriculum.json").read_text())["rank_columns"]["annotated_parquet"]["name"] == "noisy"


def test_report_follows_an_export_after_the_run_is_reranked_and_refuses_a_stale_one(run: Path, tmp_path: Path):
    out = export_curriculum(run, out=tmp_path / "paper")  # the run's own ranking, not recomputed
    first = pl.read_parquet(out / "stage-0.parquet")
    assert invoke("rank", run, "--rank-by", "noisy").exit_code == 0  # annotated.parquet's ranks are now noisy's
    text = (build_report(run, out=tmp_path / "r", curriculum=out) / "report.md").read_text()
    assert table_row(text, "stage 0")[1:4] == [str(first.height), str(first.height), f"1-{first['difficulty_rank'].max()}"]
    assert table_row(text, "stage 0")[4] == fmt(first["rouge_l"].mean())
    # The run scored again (other losses): the stage files no longer hold the rows the ranking gives them.
    annotated = pl.read_parquet(run / "annotated.parquet")
    rank(annotated.with_columns(ce_loss=pl.col("ce_loss").reverse())).write_parquet(run / "annotated.parquet")
    with pytest.raises(CurriculumError, match=r"stage-0.parquet does not hold the rows the run ranks into it now.*Export again"):
        build_report(run, out=tmp_path / "r2", curriculum=out)


def test_reexport_with_another_ranking_is_refused_unless_overwrite_and_says_what_it_replaces(run: Path, tmp_path: Path):
    out = tmp_path / "cut"
    assert invoke("export", run, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = invoke("export", run, "--rank-by", "noisy", "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (f"{out} holds an earlier export cut with other settings (ranking paper (rouge_l:desc,ce_loss:asc) -> "
            f"noisy (ifd:asc:2,ce_loss:asc,pmi:desc)); nothing in it was changed. Pass --overwrite") in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = invoke("export", run, "--stages", "5", "--out", out)
    assert result.exit_code == 1 and "stages 4 -> 5" in result.output and "keep 3 -> 4" in result.output

    result = invoke("export", run, "--rank-by", "noisy", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (f"replacing the earlier export in {out} (stage-0.parquet, stage-1.parquet, stage-2.parquet and curriculum.json), "
            "cut with other settings: ranking paper (rouge_l:desc,ce_loss:asc) -> noisy") in result.output
    assert json.loads((out / "curriculum.json").read_text())["ranking"]["rank_by"] == NOISY
    result = invoke("export", run, "--rank-by", "noisy", "--out", out)  # the same cut again: replaced, nothing to say
    assert result.exit_code == 0 and "replacing" not in result.output


def small_group_run(root: Path, small_groups: int) -> Path:
    """Two groups of 80 rows, then ``small_groups`` templates of 4 rows each, all of them the hardest rows."""
    big = annotated_frame(160, seed=3).with_columns(template=pl.when(pl.col("srd_id") % 2 == 0).then(pl.lit("big_a")).otherwise(pl.lit("big_b")))
    ids = range(160, 160 + 4 * small_groups)
    small = big.head(4 * small_groups).with_columns(
        srd_id=pl.Series(list(ids), dtype=pl.Int64), rouge_l=pl.lit(0.0), ce_loss=pl.lit(10.0) + pl.Series([i / 100 for i in ids]),
        template=pl.Series([f"tiny_{(i - 160) // 4}" for i in ids]))
    return make_run(root, frame=rank(pl.concat([big, small])))


def test_small_groups_are_shown_in_aggregate_when_none_is_flagged(tmp_path: Path):
    run = small_group_run(tmp_path / "run", small_groups=2)  # 8 rows: under min_group_rows together, never flagged
    result = invoke("export", run, "--by", "template")
    assert result.exit_code == 0, result.output
    line = ("2 groups of template under 40 ranked rows (8 rows, 4.8% of ranked rows): 2 lose every row to the dropped part "
            "(8 rows; 0.007 expected by chance); together they are 19% of the dropped part against 4.8% of all ranked rows (4.00x their share).")
    assert line in result.output and "warning" not in result.output
    small = json.loads((run / "curriculum" / "curriculum.json").read_text())["groups"][0]["small_groups"]
    assert (small["groups"], small["all_dropped_groups"], small["dropped_rows"], small["flagged"]) == (2, 2, 8, False)
    text = (build_report(run, by=["template"]) / "report.md").read_text()
    assert line in text


def test_small_groups_together_are_flagged_when_far_from_their_share(tmp_path: Path):
    run = small_group_run(tmp_path / "run", small_groups=10)  # 40 rows together, every one in the dropped part
    result = invoke("export", run, "--by", "template")
    assert result.exit_code == 0, result.output
    assert ("warning: the dropped part is 80% groups of template under 40 rows (10 groups, 40 of their 40 rows) against 20% of all "
            "ranked rows: 4.00x their share; 10 of them lose every row") in result.output
    report = invoke("report", run, "--by", "template")
    assert report.exit_code == 0 and "10 lose every row to the dropped part" in report.output
