"""The README's code runs as written: each snippet under test is marked in README.md by an HTML comment
``<!-- snippet: NAME -->`` on the line before its fenced code block.

``trl-sft``: the one-run-per-stage TRL ``SFTTrainer`` loop. It runs on the CPU, in a folder holding a
real export at ``runs/dolly/curriculum`` and a tiny GPT-2 saved as ``./gpt2`` (the snippet's
``model = "gpt2"`` then loads it from disk: no network), one optimizer step per stage (the only
change: ``SFTConfig`` is given ``max_steps=1``), two stages: two steps, in a process of its own. A missing marker fails
(the test must not pass by finding nothing); a machine without ``trl`` skips, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from .conftest import DEMO_SAMPLE

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (?P<name>[\w-]+) -->\s*\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def readme_snippets(text: str) -> dict[str, str]:
    """Every marked python snippet of a README, by name.

    Example:
        >>> readme_snippets("<!-- snippet: demo -->\\n```python\\nprint(1)\\n```\\n")
        {'demo': 'print(1)'}
    """
    return {match["name"]: match["code"] for match in SNIPPET.finditer(text)}


def test_snippet_markers_are_found():
    assert readme_snippets("text\n<!-- snippet: a -->\n```python\nx = 1\ny = 2\n```\n<!-- snippet: b -->\n```python\nz = 3\n```") == {
        "a": "x = 1\ny = 2", "b": "z = 3"}
    assert readme_snippets("```python\nx = 1\n```") == {}  # unmarked blocks are not run


def scored_run(root: Path) -> Path:
    """A finished `srdata score` folder with real prompts and references (the scores only order the rows)."""
    from srdata.steps.rank import rank

    rows = [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()][:16]
    n = len(rows)
    frame = pl.DataFrame(
        {
            "srd_id": list(range(n)),
            "prompt_text": [f"### Instruction:\n{r['instruction']}\n\n### Response:\n" for r in rows],
            "reference_text": [r["output"] for r in rows],
            "rouge_l": [(i * 7 % n) / n for i in range(n)],
            "ce_loss": [1.0 + (i * 5 % n) / n for i in range(n)],
        },
        schema_overrides={"srd_id": pl.Int64},
    )
    root.mkdir(parents=True)
    rank(frame).write_parquet(root / "annotated.parquet")
    manifest = {"srdata_version": "0.1.0", "status": "complete", "config_hash": "readme", "config": {"metrics": {"rrf_k": 60}}, "shards": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_trl_sft_snippet_runs_on_cpu(tiny_gpt2: Path, tmp_path: Path):
    snippets = readme_snippets(README.read_text(encoding="utf-8"))
    assert "trl-sft" in snippets, (
        "README.md has no snippet marked `<!-- snippet: trl-sft -->` (the line before the ```python block of the TRL "
        f"SFTTrainer loop); marked snippets found: {sorted(snippets) or 'none'}"
    )
    if importlib.util.find_spec("trl") is None:  # not imported here: the snippet runs in a process of its own
        pytest.skip("trl is not installed (pip install trl): the README's TRL snippet cannot run here")
    import srdata

    srdata.export_curriculum(scored_run(tmp_path / "runs" / "dolly"), stages=3, keep=2)  # runs/dolly/curriculum: 2 stages
    shutil.copytree(tiny_gpt2, tmp_path / "gpt2")
    (tmp_path / "snippet.py").write_text(snippets["trl-sft"], encoding="utf-8")
    # In its own process, as a user runs it: importing TRL changes transformers/vLLM state for the rest
    # of a process (vLLM's chat-template warm-up behaved differently in later tests of the suite).
    runner = tmp_path / "run_snippet.py"
    runner.write_text(RUNNER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(README.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(runner)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"global_step": 1, "model": "out/stage_1"}
    for stage in ("stage_0", "stage_1"):
        assert (tmp_path / "out" / stage / "model.safetensors").is_file()


# The snippet's settings, one optimizer step per stage (a real SFTConfig: the trainer saves it with pickle).
RUNNER = """
import json
import trl

real_config = trl.SFTConfig


def one_step(*args, **kwargs):
    return real_config(*args, **{**kwargs, "max_steps": 1, "report_to": "none"})


trl.SFTConfig = one_step
namespace = {}
exec(compile(open("snippet.py", encoding="utf-8").read(), "README.md (trl-sft)", "exec"), namespace)
print(json.dumps({"global_step": namespace["trainer"].state.global_step, "model": namespace["model"]}))
"""
