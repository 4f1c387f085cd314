"""Bad input gets a message that says what is wrong and where; the same data gives the same result in any format."""

from __future__ import annotations

import polars as pl
import pytest
from click.testing import CliRunner

import srdata
from srdata.cli import main
from srdata.steps.dataset import DatasetLoadError, load_split, resolve_columns

FAST = dict(device="cpu", dtype="float32", max_new_tokens=4, progress=False)


def score_cli(*args: str):
    return CliRunner().invoke(main, ["score", *args])


def test_empty_csv_response_is_an_empty_reference_as_in_parquet(tiny_gpt2, tmp_path):
    rows = {"prompt": ["Name a colour.", "Say nothing."], "response": ["Blue.", ""]}
    csv, parquet = tmp_path / "d.csv", tmp_path / "d.parquet"
    pl.DataFrame(rows).write_csv(csv)
    pl.DataFrame(rows).write_parquet(parquet)
    assert csv.read_text().splitlines()[-1] == 'Say nothing.,""'
    results = [srdata.score(dataset=str(f), model=str(tiny_gpt2), output=str(tmp_path / f.suffix[1:]), **FAST).to_polars()
               for f in (csv, parquet)]
    for frame in results:
        assert frame["invalid_reason"].null_count() == 2 and frame["reference_tokens"].to_list()[1] == 1  # EOS alone
    assert results[0]["ce_loss"].to_list() == results[1]["ce_loss"].to_list()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", r"d\.jsonl is empty"),
        (b"\n\n", r"d\.jsonl is empty"),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', r"d\.jsonl line 2 is not a valid JSON object"),
        (b'{"prompt": "a", "prompt": "x", "response": "b"}\n', r"key 'prompt' appears twice in one object"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", r"is not UTF-8 text \(undecodable byte at offset"),
        (b'{"prompt": "a", "response": "b"}\n["not", "an", "object"]\n', r"line 2 holds a JSON list"),
        # datasets reads these without a word (or with a vague one): the file and line are named
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "x\\ud800", "response": "b"}\n',
         r"d\.jsonl line 2 holds a lone surrogate escape \(such as \\ud800\) in a string, which is not valid Unicode text"),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n',
         r"d\.jsonl line 2 is not UTF-8 text \(undecodable byte at offset 48: 0xe9\)"),
        (b'{"prompt": ["a", "b"], "response": ["x", "y"]}\n',
         r"looks like one object with a list per column \(prompt, response\); write one object per line \(JSONL\) or a list of records"),
    ],
)
def test_broken_json_lines_name_the_file_line_and_problem(tmp_path, content, expected):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetLoadError, match=expected):
        load_split(str(path))


def test_json_documents_name_a_lone_surrogate_and_a_column_style_object(tmp_path):
    records = tmp_path / "records.json"
    records.write_text('[{"prompt": "a", "response": "b"},\n {"prompt": "\\udc00", "response": "b"}]')
    with pytest.raises(DatasetLoadError, match=r"records\.json record 1 holds a lone surrogate escape"):
        load_split(str(records))
    columns = tmp_path / "columns.json"
    columns.write_text('{\n  "prompt": ["a", "b", "c"],\n  "response": ["x", "y", "z"]\n}\n')
    with pytest.raises(DatasetLoadError, match="looks like one object with a list per column"):
        load_split(str(columns))
    pairs = tmp_path / "emoji.jsonl"  # a surrogate *pair* (json.dumps writes emoji so) is fine
    pairs.write_text('{"prompt": "\\ud83d\\ude00", "response": "b"}\n')
    assert load_split(str(pairs))["prompt"] == ["\U0001f600"]


def test_undecodable_jsonl_is_a_clear_cli_error(tmp_path, tiny_gpt2):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    result = score_cli(str(data), "--model", str(tiny_gpt2), "--output", str(tmp_path / "run"), "--device", "cpu")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "d.jsonl line 2 is not UTF-8 text" in result.output


def test_model_path_that_is_a_file(tmp_path, instruct_file):
    model = tmp_path / "model.txt"
    model.write_text("not a model")
    result = score_cli(str(instruct_file), "--model", str(model), "--output", str(tmp_path / "run"), "-q")
    assert result.exit_code != 0
    assert "is a file; pass the folder that save_pretrained wrote" in result.output
    assert "hub" not in result.output.split("is a file")[0] and "offline" not in result.output


def test_one_column_given_completes_from_known_layouts():
    assert resolve_columns(["prompt", "reference"], response_column="reference").prompt_column == "prompt"
    assert resolve_columns(["instruction", "input", "answer"], response_column="answer").input_column == "input"
    assert resolve_columns(["question", "gold"], prompt_column="question", response_column="gold").response_column == "gold"
    with pytest.raises(DatasetLoadError, match="pass --prompt-column and --response-column"):
        resolve_columns(["text", "label"], response_column="label")


def test_duplicate_csv_header_and_prompt_equal_to_response_are_warned(tiny_gpt2, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response,prompt\nSay hi.,hi,again\nSay no.,no,again\n")
    result = score_cli(str(csv), "--model", str(tiny_gpt2), "--output", str(tmp_path / "a"), "--device", "cpu",
                       "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "column(s) 'prompt' appear more than once in the header; the later copies are read as 'prompt.1'" in result.output
    same = score_cli(str(csv), "--model", str(tiny_gpt2), "--output", str(tmp_path / "b"), "--device", "cpu",
                     "--max-new-tokens", "2", "--prompt-column", "prompt", "--response-column", "prompt")
    assert same.exit_code == 0, same.output
    assert "column 'prompt' is both the prompt and the response" in same.output


def test_cuda_device_without_a_gpu_is_a_clear_error(tiny_gpt2, instruct_file, tmp_path, monkeypatch):
    import srdata.backends

    monkeypatch.setattr(srdata.backends, "_gpu_visible", lambda: False)  # the same on a machine that has a GPU
    result = score_cli(str(instruct_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "run"), "--device", "cuda")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--device cuda: torch sees no CUDA GPU" in result.output and "pass --device cpu" in result.output
    assert not (tmp_path / "run").exists()  # refused before any work


def test_export_and_distill_point_to_the_folder_that_exists(tmp_path):
    from srd_distill.data import curriculum_stage_files
    from srd_distill.errors import CurriculumFilesError
    from srdata.curriculum.export import CurriculumError, export_curriculum
    from tests._runs import make_run

    runs = tmp_path / "runs"
    run = make_run(runs / "a")
    out = export_curriculum(run)
    with pytest.raises(CurriculumError, match=r"is a folder of runs \(a\), not a run; pass one of them"):
        export_curriculum(runs)
    with pytest.raises(CurriculumError, match=r"is an export .* not a run; its run is .*runs/a"):
        export_curriculum(out)
    with pytest.raises(CurriculumFilesError, match=r"is a scoring run, not a curriculum; its export is .*a/curriculum"):
        curriculum_stage_files(run, 3, "paper-gpt2")


def test_quiet_score_prints_nothing_and_ctrl_c_says_how_to_resume(tiny_gpt2, instruct_file, tmp_path, monkeypatch):
    import subprocess
    import sys

    args = [sys.executable, "-m", "srdata.cli", "score", str(instruct_file), "--model", str(tiny_gpt2), "--output",
            str(tmp_path / "run"), "--device", "cpu", "--max-new-tokens", "2", "-q"]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout == "" and "%|" not in quiet.stderr, quiet.stderr

    import srdata.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(srdata.pipeline, "score", interrupted)
    result = score_cli(str(instruct_file), "--model", str(tiny_gpt2), "--output", str(tmp_path / "run2"))
    assert result.exit_code == 130
    assert "run the same command again to resume" in result.output


def test_report_lists_its_figures(tmp_path):
    from srdata.cli import report_cmd
    from tests._runs import make_run

    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(report_cmd, [str(run)])
    assert result.exit_code == 0, result.output
    assert ".png" in result.output and "figures in" in result.output
