"""``srdata demo``: SRD's data step on the controlled testbed, offline, in about a minute.

The quick testbed (:mod:`srdata.demo.testbed`) holds synthetic instruction pairs whose
difficulty is known (four task families, four levels) and 10% noisy pairs whose responses
were replaced by wrong ones (the location of the noise is known). A tiny character-level
Llama student gets a short warm-up on other clean pairs, then the real pipeline runs:
``srdata.score`` (greedy answer, ROUGE-L, cross-entropy, rank fusion) and
``srdata.export_curriculum`` (4 stages, keep the easiest 3, ``by="task"``). The summary
shows whether the difficulty ranking tracks the known level and whether the noisy pairs
land in the dropped quarter, for the fused ranking and for each of its two rankings alone;
then each task's share of every stage and of the dropped part, with the warnings for the
tasks far from their share, a stratified export for comparison (``stratify="task"``), and
what these numbers mean for how much to drop.

Example:
    >>> from srdata.demo.walkthrough import run_demo
    >>> summary = run_demo("runs/demo")                                   # doctest: +SKIP
    >>> summary["by_ranking"]["difficulty_rank"]["noisy_recall"] > 0.25   # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

DEMO_TRAIN_PAIRS = 600
DEMO_WARMUP_STEPS = 300
DEMO_MAX_NEW_TOKENS = 24
DEMO_MAX_PROMPT_TOKENS = 64
DEMO_MAX_REFERENCE_TOKENS = 32


def demo_spec(train_pairs: int = DEMO_TRAIN_PAIRS, seed: int = 0):
    """The testbed the demo scores: ``train_pairs`` noisy training pairs and a clean warm-up set.

    Example:
        >>> demo_spec().noise_fraction
        0.1
    """
    from srdata.demo.testbed import TestbedSpec

    return TestbedSpec(train_pairs=train_pairs, dev_pairs=0, test_pairs=0, teacher_pairs=0, warmup_pairs=2000, seed=seed)


def run_demo(
    output: str | Path,
    train_pairs: int = DEMO_TRAIN_PAIRS,
    warmup_steps: int = DEMO_WARMUP_STEPS,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the quick testbed and a warmed-up student, score and export, print and return the summary.

    The student is rebuilt only when ``output/student`` does not hold one; scoring resumes
    (or starts over) in ``output/run``.
    """
    from srdata.demo.tiny import build_char_model, quiet_transformers, train_on_pairs
    from srdata.curriculum.export import export_curriculum
    from srdata.curriculum.groups import GroupShareWarning, advice, format_share_table
    from srdata.pipeline import score
    from srdata.demo.testbed import TASKS, build_testbed, format_ranking_summary, ranking_summary, read_jsonl

    started = time.perf_counter()
    output = Path(output)
    files = build_testbed(output / "testbed", demo_spec(train_pairs, seed))
    echo(f"testbed: {files.counts['train']} training pairs ({files.counts['train_noisy']} noisy) in {files.train}; "
         f"tasks {', '.join(TASKS)} at difficulty levels 1-4")
    student = output / "student"
    if not (student / "config.json").exists():
        echo(f"building a character-level Llama student (2 layers, hidden 64) in {student}, "
             f"warm-up: {warmup_steps} steps on clean pairs")
        warm = read_jsonl(files.warmup)
        with quiet_transformers():
            build_char_model(student, "llama", hidden_size=64, num_layers=2, num_heads=4, seed=seed)
            train_on_pairs(student, [r["prompt"] for r in warm], [r["response"] for r in warm], steps=warmup_steps,
                           batch_size=64, lr=3e-3, warmup_steps=50, seed=seed)
    result = score(
        dataset=str(files.train), model=str(student), output=str(output / "run"), template="raw",
        max_new_tokens=DEMO_MAX_NEW_TOKENS, shard_size=200, device="cpu", seed=seed, overwrite=True, echo=echo,
        # the character-level student has 128 positions; testbed prompts and answers are short
        max_prompt_tokens=DEMO_MAX_PROMPT_TOKENS, max_reference_tokens=DEMO_MAX_REFERENCE_TOKENS,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupShareWarning)  # shown below, beside the table they come from
        curriculum = export_curriculum(result.output, stages=4, keep=3, by="task")
        stratified = export_curriculum(result.output, stages=4, keep=3, stratify="task", out=result.output / "curriculum-stratified")
    summary = ranking_summary(result.to_polars())
    shares = json.loads((curriculum / "curriculum.json").read_text())["groups"][0]
    summary["task_shares"] = shares
    echo("")
    echo(format_ranking_summary(summary))
    echo(f"\nShare of each task in every stage file and in the dropped part "
         f"(! = more than {shares['max_share_ratio']:g}x, or under 1/{shares['max_share_ratio']:g} of, its share of all pairs):")
    for line in format_share_table(shares):
        echo(f"  {line}")
    for message in shares["warnings"]:
        echo(f"warning: {message}")
    if shares["warnings"]:
        echo(advice(shares))
    echo("")
    echo(how_much_to_drop(summary, shares))
    echo(f"\ncurriculum (4 stages, easiest 3 kept): {curriculum}")
    echo(f"the same cut within every task (--stratify task: each task keeps its share of every stage): {stratified}")
    echo(f"annotated rows: {result.annotated_path}")
    echo("next: distil on it with `srd-distill train`, or run the whole comparison with "
         "`python benchmarks/repro/run.py --quick` (SRD vs full-data KD)")
    echo(f"demo finished in {time.perf_counter() - started:.0f}s")
    return summary


def how_much_to_drop(summary: Mapping[str, Any], shares: Mapping[str, Any]) -> str:
    """What the demo's numbers mean for a user choosing how much to drop (one paragraph, with the numbers).

    ``summary`` is :func:`srdata.demo.testbed.ranking_summary` of the scored pairs, ``shares``
    the :func:`srdata.curriculum.groups.group_shares` entry of the task column.

    Example:
        >>> print(how_much_to_drop(summary, shares))          # doctest: +SKIP
        How much to drop: the dropped 150 pairs hold 56 of the 60 noisy pairs (93%) and 94 clean ones: ...
    """
    fused = summary["by_ranking"]["difficulty_rank"]
    dropped, noisy = summary["dropped_rows"], fused["noisy_dropped"]
    clean = dropped - noisy
    column = shares["column"]
    worst = max(shares["table"], key=lambda e: (e["parts"]["dropped"]["ratio"] or 0.0))
    part = worst["parts"]["dropped"]
    lost = part["rows"] / worst["rows"] if worst["rows"] else 0.0
    return (
        f"How much to drop: the dropped {dropped} pairs hold {noisy} of the {summary['noisy_rows']} noisy pairs "
        f"({fused['noisy_recall']:.0%}; a random cut would hold {dropped / summary['rows']:.0%}) and {clean} clean ones, "
        f"so each noisy pair removed costs {clean / max(noisy, 1):.1f} clean pairs. The cut is not spread evenly: it takes "
        f"{lost:.0%} of {column} {worst['value']!r} ({part['rows']} of {worst['rows']}, {part['ratio']:.1f}x its share), "
        f"the pairs this student finds hardest, which are the ones distillation has to teach. Drop the hardest quarter "
        f"when the dropped part is mostly noise and holds every {column} near its share; when it concentrates on a "
        f"{column} you need, keep that {column}'s share with --stratify {column}, or drop less (--keep 4 keeps every "
        f"part, POCL-style; --fractions 0.3,0.6,0.9 drops 10%). On this testbed dropping and easy-first stages cost "
        f"quality against full-data KD (benchmarks/README.md, end-to-end reproduction)."
    )
