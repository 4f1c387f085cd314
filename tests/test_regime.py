"""Which regime a run is in (srdata/curriculum/regime.py): the statement, the figure and the warning of `srdata report`/`export`.

Real runs, in miniature: a character-level Llama learns the testbed's ``copy`` family (the
teacher), training pairs are scored by a student and taught by the teacher (``srdata score``,
``srdata teach``), then cut by the real ``srdata export`` / ``srdata report``.

* *teachable*: a weak student (today's testbed in miniature): what it finds hardest is
  mostly clean rows the teacher does -> the statement says so and the warning fires;
* *noise*: the teacher is its own student and 25% of the references are another row's:
  the hardest quarter is the wrong references, which the teacher does not do either -> no warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from srdata.curriculum.regime import KEPT_QUANTILE, REGIME_FIGURE, WARN_SHARE, RegimeWarning, regime_statement
from tests._threads import single_torch_thread

pytestmark = pytest.mark.filterwarnings("ignore::srdata.curriculum.groups.GroupShareWarning")


def test_statement_counts_dropped_rows_within_the_kept_quantile():
    kept = [0.1 * i for i in range(1, 11)]  # 90th percentile (linear) = 0.91
    statement = regime_statement(pl.Series(range(1, 15)), pl.Series(kept + [0.5, 0.9, 0.95, 7.0]), kept_rows=10)
    assert statement["threshold"] == pytest.approx(0.91)
    assert (statement["dropped_rows"], statement["teachable_rows"]) == (4, 2)
    assert statement["teachable_share"] == 0.5 and statement["mostly_teachable"] is (0.5 >= WARN_SHARE)
    assert statement["kept_quantile"] == KEPT_QUANTILE
    # Unranked rows and rows without a teacher figure are left out; nothing dropped -> nothing to say.
    with_nulls = regime_statement(pl.Series([1, None, 2, 3]), pl.Series([0.1, 9.0, None, 5.0]), kept_rows=1)
    assert (with_nulls["kept_rows"], with_nulls["dropped_rows"]) == (1, 1)
    assert regime_statement(pl.Series([1, 2]), pl.Series([0.1, 0.2]), kept_rows=2) is None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and a shared machine loses a lot to spinning threads."""
    pytest.importorskip("torch")
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def copy_models(tmp_path_factory):
    """A teacher that learned ``copy`` for 250 steps and a weak student (5 steps), both character-level Llamas."""
    from srdata.demo.testbed import generate_pairs
    from srdata.demo.tiny import build_char_model, quiet_transformers, train_on_pairs

    root = tmp_path_factory.mktemp("regime-models")
    pairs = generate_pairs(2000, seed=11, tasks=("copy",))
    prompts, responses = [r["prompt"] for r in pairs], [r["response"] for r in pairs]
    with quiet_transformers():
        teacher = build_char_model(root / "teacher", "llama", hidden_size=64, num_layers=2, num_heads=4, seed=0)
        train_on_pairs(teacher, prompts, responses, steps=250, batch_size=32, lr=5e-3, warmup_steps=20, seed=0)
        student = build_char_model(root / "student", "llama", hidden_size=64, num_layers=2, num_heads=4, seed=1)
        train_on_pairs(student, prompts, responses, steps=5, batch_size=32, lr=3e-3, seed=1)
    return Path(teacher), Path(student)


def _taught_run(folder: Path, student: Path, teacher: Path, noise: float) -> Path:
    """``srdata score`` then ``srdata teach`` on 160 copy pairs with ``noise`` misaligned references."""
    from srdata.demo.testbed import TestbedSpec, build_testbed
    from srdata import score, teach

    files = build_testbed(folder / "testbed", TestbedSpec(train_pairs=160, dev_pairs=0, test_pairs=0, teacher_pairs=0, warmup_pairs=0,
                                                          noise_fraction=noise, tasks=("copy",), seed=3))
    run = folder / "run"
    score(dataset=str(files.train), model=str(student), output=str(run), template="raw", max_new_tokens=12, device="cpu",
          dtype="float32", max_prompt_tokens=64, max_reference_tokens=32, progress=False)
    teach(run=run, teacher=str(teacher), device="cpu", dtype="float32", progress=False)
    return run


def _export_and_report(run: Path) -> tuple[str, list[str], Path]:
    """The real `srdata export` (its stderr) and `srdata report` (its RegimeWarnings, its folder)."""
    from srdata.cli import main
    from srdata.curriculum.report import build_report

    exported = CliRunner().invoke(main, ["export", str(run)])
    assert exported.exit_code == 0, exported.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = build_report(run)
    return exported.output, [str(w.message) for w in caught if issubclass(w.category, RegimeWarning)], folder


def test_warning_fires_when_the_dropped_part_is_teachable(tmp_path, copy_models):
    teacher, student = copy_models
    run = _taught_run(tmp_path, student, teacher, noise=0.10)
    frame = pl.read_parquet(run / "annotated.parquet")
    dropped = frame.filter(pl.col("difficulty_rank") > 3 * (frame.height // 4))
    assert dropped["is_noisy"].mean() < 0.5  # the weak student's hardest quarter is mostly clean rows
    output, regime_warnings, folder = _export_and_report(run)
    assert "The teacher can do" in output and "the dropped part is mostly rows the teacher can do" in output
    assert "warning: the part this cut drops is mostly teachable" in output
    assert len(regime_warnings) == 1 and "mostly teachable" in regime_warnings[0]
    report = (folder / "report.md").read_text()
    assert "## Regime: can the teacher do the dropped part?" in report and "Warning: the part this cut drops" in report
    assert (folder / REGIME_FIGURE).stat().st_size > 0


def test_no_warning_when_the_dropped_part_is_mostly_noise(tmp_path, copy_models):
    teacher, _ = copy_models
    run = _taught_run(tmp_path, teacher, teacher, noise=0.25)  # the teacher as its own student
    frame = pl.read_parquet(run / "annotated.parquet")
    dropped = frame.filter(pl.col("difficulty_rank") > 3 * (frame.height // 4))
    assert dropped["is_noisy"].mean() > 0.5  # the hardest quarter is mostly the wrong references
    output, regime_warnings, folder = _export_and_report(run)
    assert "The teacher can do" in output and "the teacher cannot do or whose reference it disagrees with" in output
    assert "mostly teachable" not in output and regime_warnings == []
    report = (folder / "report.md").read_text()
    assert "## Regime: can the teacher do the dropped part?" in report and "Warning: the part this cut drops" not in report


def test_no_statement_without_a_teacher_pass(tmp_path, copy_models):
    from srdata.pipeline import score
    from srdata.demo.testbed import TestbedSpec, build_testbed

    _, student = copy_models
    files = build_testbed(tmp_path / "tb", TestbedSpec(train_pairs=40, dev_pairs=0, test_pairs=0, teacher_pairs=0, warmup_pairs=0,
                                                       tasks=("copy",)))
    score(dataset=str(files.train), model=str(student), output=str(tmp_path / "run"), template="raw", max_new_tokens=8, device="cpu",
          dtype="float32", max_prompt_tokens=64, max_reference_tokens=32, progress=False)
    output, regime_warnings, folder = _export_and_report(tmp_path / "run")
    assert "The teacher can do" not in output and regime_warnings == []
    assert "Regime:" not in (folder / "report.md").read_text() and not (folder / REGIME_FIGURE).exists()
