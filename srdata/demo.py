"""``srdata demo``: SRD's data step on the controlled testbed, offline, in about a minute.

The quick testbed (:mod:`srdata.testbed`) holds synthetic instruction pairs whose
difficulty is known (four task families, four levels) and 10% noisy pairs whose responses
were replaced by wrong ones (the location of the noise is known). A tiny character-level
Llama student gets a short warm-up on other clean pairs, then the real pipeline runs:
``srdata.score`` (greedy answer, ROUGE-L, cross-entropy, rank fusion) and
``srdata.export_curriculum`` (4 stages, keep the easiest 3). The summary shows whether the
difficulty ranking tracks the known level and whether the noisy pairs land in the dropped
quarter, for the fused ranking and for each of its two rankings alone.

Example:
    >>> from srdata.demo import run_demo
    >>> summary = run_demo("runs/demo")                                   # doctest: +SKIP
    >>> summary["by_ranking"]["difficulty_rank"]["noisy_recall"] > 0.25   # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

DEMO_TRAIN_PAIRS = 600
DEMO_WARMUP_STEPS = 300
DEMO_MAX_NEW_TOKENS = 24
DEMO_MAX_PROMPT_TOKENS = 64
DEMO_MAX_REFERENCE_TOKENS = 32


def sample_path() -> Path:
    """The bundled real sample (64 SelfInst instruction/input/output rows, Apache-2.0), used by tests."""
    from importlib import resources

    return Path(str(resources.files("srdata") / "data" / "demo.jsonl"))


def demo_spec(train_pairs: int = DEMO_TRAIN_PAIRS, seed: int = 0):
    """The testbed the demo scores: ``train_pairs`` noisy training pairs and a clean warm-up set.

    Example:
        >>> demo_spec().noise_fraction
        0.1
    """
    from .testbed import TestbedSpec

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
    from .backends.tiny import build_char_model, quiet_transformers, train_on_pairs
    from .export import export_curriculum
    from .pipeline import score
    from .testbed import TASKS, build_testbed, format_ranking_summary, ranking_summary, read_jsonl

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
    curriculum = export_curriculum(result.output, stages=4, keep=3)
    summary = ranking_summary(result.to_polars())
    echo("")
    echo(format_ranking_summary(summary))
    echo(f"\ncurriculum (4 stages, easiest 3 kept): {curriculum}")
    echo(f"annotated rows: {result.annotated_path}")
    echo("next: distil on it with `srd-distill train`, or run the whole comparison with "
         "`python benchmarks/repro/run.py --quick` (SRD vs full-data KD)")
    echo(f"demo finished in {time.perf_counter() - started:.0f}s")
    return summary
