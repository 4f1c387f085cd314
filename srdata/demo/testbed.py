"""A controlled testbed for SRD: synthetic instruction pairs of known difficulty and known noise.

Every pair is a small symbolic task written as text, one character per item, items
separated by spaces, so ROUGE-L (which splits on whitespace) gives partial credit item by
item and a character-level tokenizer covers everything:

========  ==========================  ==============  ==============================
task      prompt (level 2 example)    response        difficulty knob (level 1..4)
========  ==========================  ==============  ==============================
copy      ``copy k d w p``            ``k d w p``     level+2 letters
reverse   ``reverse k d w p``         ``p w d k``     level+2 letters
shift     ``shift k d w z``           ``l e x a``     level+2 letters, each -> next letter
sort      ``sort 7 1 9 1``            ``1 1 7 9``     level+2 digits
========  ==========================  ==============  ==============================

An ``add`` family (a (level+1)-digit number plus one digit, digits least significant
first) is available through ``tasks=(..., "add")`` but is not in the default ``TASKS``:
the 4-layer teacher the laptop budget allows did not learn it (10-33% exact match after
1,250-2,000 steps in the variants tried: two k-digit numbers in either digit order, or a
one-digit addend), and a testbed whose teacher cannot do a family measures the teacher
rather than SRD.

(Each prompt ends with a newline; the response follows it.) The difficulty of a pair is
known twice: its ``level`` (longer inputs) and its task.

**Noise.** In the training split a fixed fraction of pairs (10% by default) gets a wrong
response: the response of another, randomly chosen training pair (a *misaligned*
response, the most common label error of instruction data). The pair keeps
``is_noisy = True`` and its ``clean_response``; these columns are for evaluation only.
Nothing that trains or scores reads them.

**Splits.** ``train`` (noisy), and clean ``dev`` (checkpoint selection) and ``test``
(final evaluation) sets, generated with other seeds, every (task, level) cell equally
represented. Files are JSON lines with the columns ``prompt``, ``response``, ``task``,
``difficulty``, ``is_noisy``, ``clean_response``, ``pair_id``; ``srdata score`` detects
the prompt/response layout by itself (use ``--template raw``: the prompt is the full
text the model sees).

**Tokenizer.** :func:`char_tokenizer` is a character-level ``PreTrainedTokenizerFast``
(printable ASCII + newline, specials ``<pad> <s> </s> <unk>``) that saves and loads like
any Hugging Face tokenizer.

Example:
    >>> import random
    >>> make_pair("reverse", 1, random.Random(0))
    ('reverse m y n\\n', 'n y m')
    >>> rows = generate_pairs(40, seed=1)
    >>> sorted({r["task"] for r in rows}) == sorted(TASKS), len(rows)
    (True, 40)
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from srdata.demo.regimes import EXTRA_MAKERS, EXTRA_TASK_TABLE, regime_settings

__all__ = [
    "TASKS",
    "LEVELS",
    "TestbedSpec",
    "TestbedFiles",
    "make_pair",
    "generate_pairs",
    "inject_noise",
    "build_testbed",
    "char_tokenizer",
    "save_char_tokenizer",
    "read_jsonl",
    "ranking_summary",
    "format_ranking_summary",
    "write_jsonl",
    "CHARACTERS",
    "SPECIAL_TOKENS",
]

TASKS: tuple[str, ...] = ("copy", "reverse", "shift", "sort")
LEVELS: tuple[int, ...] = (1, 2, 3, 4)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
# Printable ASCII (space included) plus newline: one token per character.
CHARACTERS: tuple[str, ...] = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")


def _spaced(items: Iterable[Any]) -> str:
    return " ".join(str(item) for item in items)


def _copy(level: int, rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(level + 2)]
    return f"copy {_spaced(letters)}\n", _spaced(letters)


def _reverse(level: int, rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(level + 2)]
    return f"reverse {_spaced(letters)}\n", _spaced(reversed(letters))


def _sort(level: int, rng: random.Random) -> tuple[str, str]:
    digits = [rng.randrange(10) for _ in range(level + 2)]
    return f"sort {_spaced(digits)}\n", _spaced(sorted(digits))


def _number(digits: int, rng: random.Random) -> int:
    """A number with exactly ``digits`` digits (0-9 for one digit)."""
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def _add(level: int, rng: random.Random) -> tuple[str, str]:
    # A number of level+1 digits plus a one-digit number; every number is written least
    # significant digit first (as in studies of arithmetic learning), so the carry chain
    # runs in the order the answer is written.
    a, b = _number(level + 1, rng), _number(1, rng)
    return f"add {_spaced(str(a)[::-1])} + {b}\n", _spaced(str(a + b)[::-1])


def _shift(level: int, rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(level + 2)]
    return f"shift {_spaced(letters)}\n", _spaced(LETTERS[(LETTERS.index(c) + 1) % 26] for c in letters)


TASK_MAKERS: dict[str, Callable[[int, random.Random], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "shift": _shift,
    "add": _add,  # not in TASKS: too hard for the testbed's small teacher (see the module docstring)
    **EXTRA_MAKERS,  # count, extract: the paper regime's other hard families (srdata.demo.regimes)
}


def make_pair(task: str, level: int, rng: random.Random) -> tuple[str, str]:
    """One ``(prompt, response)`` pair of ``task`` at difficulty ``level`` (1 = easiest).

    Example:
        >>> make_pair("add", 2, random.Random(3))
        ('add 3 4 3 + 9\\n', '2 5 3')
    """
    if task not in TASK_MAKERS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    return TASK_MAKERS[task](level, rng)


def generate_pairs(
    n: int,
    seed: int,
    tasks: Sequence[str] = TASKS,
    levels: Sequence[int] = LEVELS,
    id_offset: int = 0,
) -> list[dict[str, Any]]:
    """``n`` clean pairs, every (task, level) cell equally often (up to one), in random order.

    Each row has ``pair_id, task, difficulty, prompt, response, clean_response, is_noisy``.
    The same ``seed`` gives the same rows.

    Example:
        >>> rows = generate_pairs(20, seed=0)
        >>> rows == generate_pairs(20, seed=0), {r["difficulty"] for r in rows} == set(LEVELS)
        (True, True)
    """
    rng = random.Random(seed)
    cells = [(t, lv) for t in tasks for lv in levels]
    plan = [cells[i % len(cells)] for i in range(n)]
    rng.shuffle(plan)
    rows = []
    for i, (task, level) in enumerate(plan):
        prompt, response = make_pair(task, level, rng)
        rows.append({
            "pair_id": id_offset + i, "task": task, "difficulty": level, "prompt": prompt,
            "response": response, "clean_response": response, "is_noisy": False,
        })
    return rows


def inject_noise(rows: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """Give ``round(fraction * len(rows))`` randomly chosen rows a wrong response.

    The wrong response is the response of another, randomly chosen row that differs from
    the right one. Those rows get ``is_noisy = True``; ``clean_response`` keeps the right
    answer. Returns new row dicts (the input is not changed).

    Example:
        >>> noisy = inject_noise(generate_pairs(50, seed=0), 0.1, seed=0)
        >>> sum(r["is_noisy"] for r in noisy), all(r["response"] != r["clean_response"] for r in noisy if r["is_noisy"])
        (5, True)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"noise fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    out = [dict(r) for r in rows]
    n_noisy = round(fraction * len(out))
    for i in rng.sample(range(len(out)), n_noisy):
        while True:
            donor = out[rng.randrange(len(out))]["clean_response"]
            if donor != out[i]["clean_response"]:
                break
        out[i]["response"] = donor
        out[i]["is_noisy"] = True
    return out


@dataclass(frozen=True)
class TestbedSpec:
    """Sizes, noise and seeds of one testbed; the same spec always gives the same files.

    ``teacher_pairs`` clean pairs (another seed) are written for the teacher's supervised
    fine-tuning and ``warmup_pairs`` for the student's warm-up; neither overlaps the
    distillation data by construction (other seeds), though short inputs can repeat by
    chance.
    """

    __test__ = False  # not a pytest test class, despite the name

    train_pairs: int = 2000
    dev_pairs: int = 200
    test_pairs: int = 800
    teacher_pairs: int = 20000
    warmup_pairs: int = 2000
    noise_fraction: float = 0.10
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    levels: tuple[int, ...] = LEVELS

    def seeds(self) -> dict[str, int]:
        """One seed per split, derived from ``seed`` (splits never share a random stream)."""
        base = 1000 * self.seed
        return {"train": base + 1, "noise": base + 2, "dev": base + 3, "test": base + 4, "teacher": base + 5, "warmup": base + 6}


@dataclass
class TestbedFiles:
    """Where :func:`build_testbed` wrote the splits."""

    __test__ = False

    folder: Path
    train: Path
    dev: Path
    test: Path
    teacher_sft: Path
    warmup: Path
    spec_file: Path
    counts: dict[str, int] = field(default_factory=dict)


def build_testbed(folder: str | Path, spec: TestbedSpec = TestbedSpec(), regime: Optional[str] = None) -> TestbedFiles:
    """Write ``train/dev/test/teacher_sft/warmup.jsonl`` and ``testbed.json`` into ``folder``.

    ``regime`` (``"teachable"`` or ``"paper"``, :mod:`srdata.demo.regimes`) sets the spec's
    ``tasks`` and ``noise_fraction``; ``None`` uses the spec as given (the default spec is
    the ``teachable`` regime, and gives the same files either way).

    Example:
        >>> files = build_testbed("/tmp/testbed", TestbedSpec(train_pairs=400))   # doctest: +SKIP
        >>> files.counts["train_noisy"]                                            # doctest: +SKIP
        40
    """
    if regime is not None:
        spec = replace(spec, **regime_settings(regime))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = spec.seeds()
    cells = dict(tasks=spec.tasks, levels=spec.levels)
    train = inject_noise(generate_pairs(spec.train_pairs, seeds["train"], **cells), spec.noise_fraction, seeds["noise"])
    offset = spec.train_pairs
    splits: dict[str, list[dict[str, Any]]] = {"train": train}
    for name, n in (("dev", spec.dev_pairs), ("test", spec.test_pairs), ("teacher_sft", spec.teacher_pairs), ("warmup", spec.warmup_pairs)):
        seed_key = {"teacher_sft": "teacher"}.get(name, name)
        splits[name] = generate_pairs(n, seeds[seed_key], id_offset=offset, **cells)
        offset += n
    paths = {name: write_jsonl(folder / f"{name}.jsonl", rows) for name, rows in splits.items()}
    counts = {name: len(rows) for name, rows in splits.items()}
    counts["train_noisy"] = sum(r["is_noisy"] for r in train)
    spec_file = folder / "testbed.json"
    from srdata.run.io import write_json_atomic

    record = {"spec": asdict(spec), "seeds": seeds, "counts": counts, "tasks": _task_table(spec.tasks)}
    if regime is not None:
        record["regime"] = regime
    write_json_atomic(spec_file, record)
    return TestbedFiles(folder, paths["train"], paths["dev"], paths["test"], paths["teacher_sft"], paths["warmup"], spec_file, counts)


def _task_table(tasks: Sequence[str] = TASKS) -> dict[str, str]:
    extra = {t: EXTRA_TASK_TABLE[t] for t in tasks if t in EXTRA_TASK_TABLE}  # only when used: today's testbed.json unchanged
    return {
        "add": "add a one-digit number to a number of level+1 digits, digits written least significant first (not default)",
        "copy": "repeat level+2 letters",
        "reverse": "reverse level+2 letters",
        "sort": "sort level+2 digits ascending",
        "shift": "replace each of level+2 letters by the next letter of the alphabet (z -> a)",
        **extra,
    }


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically.

    Example:
        >>> write_jsonl("/tmp/rows.jsonl", [{"prompt": "copy a\\n", "response": "a"}])   # doctest: +SKIP
        PosixPath('/tmp/rows.jsonl')
    """
    from srdata.run.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON lines file.

    Example:
        >>> read_jsonl("/tmp/rows.jsonl")[0]["response"]   # doctest: +SKIP
        'a'
    """
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def char_tokenizer(characters: Sequence[str] = CHARACTERS):
    """A character-level Hugging Face fast tokenizer: one token per character.

    Specials: ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2, end of sequence), ``<unk>`` (3);
    no BOS is added (GPT-2 style). Unknown characters become ``<unk>``.

    Example:
        >>> tok = char_tokenizer()
        >>> ids = tok("add 1 + 2\\n", add_special_tokens=False)["input_ids"]
        >>> len(ids), tok.decode(ids)
        (10, 'add 1 + 2\\n')
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(characters))}
    if len(vocab) != len(SPECIAL_TOKENS) + len(characters):
        raise ValueError("characters must be unique and must not repeat a special token")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
    backend.decoder = decoders.Fuse()  # join tokens without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def save_char_tokenizer(path: str | Path) -> Path:
    """Save :func:`char_tokenizer` with ``save_pretrained`` (load it with ``AutoTokenizer``).

    Example:
        >>> save_char_tokenizer("/tmp/chartok")             # doctest: +SKIP
        >>> AutoTokenizer.from_pretrained("/tmp/chartok")  # doctest: +SKIP
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    char_tokenizer().save_pretrained(path)
    return path


RANKINGS: tuple[str, ...] = ("difficulty_rank", "rank_rouge_l", "rank_ce_loss")


def ranking_summary(annotated: Any, stages: int = 4, keep: int = 3) -> dict[str, Any]:
    """How well SRD's rankings of a scored testbed split match the known difficulty and noise.

    ``annotated`` is the ``annotated.parquet`` of ``srdata score`` on a testbed file (a
    polars DataFrame or a path): it keeps the testbed's ``task``, ``difficulty`` and
    ``is_noisy`` columns beside the ranks. The *dropped part* is what ``srdata export
    --stages 4 --keep 3`` leaves out: every row ranked after ``keep * (N // stages)``.
    For each ranking (the fused ``difficulty_rank`` and each of ``rank_rouge_l`` and
    ``rank_ce_loss`` alone) the summary gives ``noisy_recall`` (share of the noisy pairs
    that land in the dropped part; chance is its size share, about 25%) and
    ``noisy_precision`` (share of the dropped part that is noisy). Also: the Spearman rank
    correlation of the two rankings (``rank_agreement``) and of the fused rank with the
    known level, the mean fused rank and dropped share per level and per task.

    Example:
        >>> summary = ranking_summary("runs/repro/seed-0/score/annotated.parquet")   # doctest: +SKIP
        >>> summary["by_ranking"]["difficulty_rank"]["noisy_recall"]                # doctest: +SKIP
        0.93
    """
    import polars as pl

    frame = annotated if isinstance(annotated, pl.DataFrame) else pl.read_parquet(annotated)
    frame = frame.filter(pl.col("difficulty_rank").is_not_null())
    n = frame.height
    kept_rows = keep * (n // stages)
    noisy_total = int(frame["is_noisy"].sum())
    by_ranking = {}
    for column in RANKINGS:
        dropped = frame.filter(pl.col(column) > kept_rows)
        noisy_dropped = int(dropped["is_noisy"].sum())
        by_ranking[column] = {
            "dropped_rows": dropped.height,
            "noisy_dropped": noisy_dropped,
            "noisy_recall": noisy_dropped / noisy_total if noisy_total else None,
            "noisy_precision": noisy_dropped / dropped.height if dropped.height else None,
        }

    def spearman(a: str, b: str) -> float:
        ranked = frame.select(pl.col(a).rank("average").alias("a"), pl.col(b).rank("average").alias("b"))
        return float(ranked.select(pl.corr("a", "b"))[0, 0])

    dropped_flag = (pl.col("difficulty_rank") > kept_rows).cast(pl.Float64)

    def grouped(key: str) -> dict[str, dict[str, float]]:
        table = frame.group_by(key).agg(
            pl.len().alias("rows"),
            pl.col("difficulty_rank").mean().alias("mean_difficulty_rank"),
            dropped_flag.mean().alias("dropped_share"),
            pl.col("rouge_l").mean().alias("mean_rouge_l"),
            pl.col("ce_loss").mean().alias("mean_ce_loss"),
        ).sort(key)
        return {str(row[key]): {k: v for k, v in row.items() if k != key} for row in table.iter_rows(named=True)}

    clean = frame.filter(~pl.col("is_noisy"))
    return {
        "rows": n,
        "noisy_rows": noisy_total,
        "kept_rows": kept_rows,
        "dropped_rows": n - kept_rows,
        "by_ranking": by_ranking,
        "rank_agreement": spearman("rank_rouge_l", "rank_ce_loss"),
        "difficulty_rank_vs_level": spearman("difficulty_rank", "difficulty"),
        "difficulty_rank_vs_level_clean_rows": float(
            clean.select(pl.col("difficulty_rank").rank("average").alias("a"), pl.col("difficulty").rank("average").alias("b"))
            .select(pl.corr("a", "b"))[0, 0]
        ),
        "by_difficulty": grouped("difficulty"),
        "by_task": grouped("task"),
        "by_noise": grouped("is_noisy"),
    }


def format_ranking_summary(summary: dict[str, Any]) -> str:
    """A plain-text report of :func:`ranking_summary` (what ``srdata demo`` prints).

    Example:
        >>> print(format_ranking_summary(ranking_summary(frame)))   # doctest: +SKIP
    """
    lines = [
        f"{summary['rows']} training pairs, {summary['noisy_rows']} of them noisy; "
        f"the hardest {summary['dropped_rows']} (ranks > {summary['kept_rows']}) are dropped by `srdata export --stages 4 --keep 3`.",
        "",
        "Known difficulty level vs SRD difficulty rank (1 = easiest), clean and noisy rows:",
        "  level  rows  mean rank  dropped  mean ROUGE-L  mean CE",
    ]
    for level, row in summary["by_difficulty"].items():
        lines.append(f"  {level:>5}  {row['rows']:>4}  {row['mean_difficulty_rank']:>9.0f}  {row['dropped_share']:>7.0%}"
                     f"  {row['mean_rouge_l']:>12.3f}  {row['mean_ce_loss']:>7.3f}")
    lines.append(f"  Spearman(rank, level) = {summary['difficulty_rank_vs_level']:.2f} "
                 f"(clean rows only: {summary['difficulty_rank_vs_level_clean_rows']:.2f})")
    lines += ["", "By task:", "  task      rows  mean rank  dropped  mean ROUGE-L  mean CE"]
    for task, row in sorted(summary["by_task"].items(), key=lambda kv: kv[1]["mean_difficulty_rank"]):
        lines.append(f"  {task:<8}  {row['rows']:>4}  {row['mean_difficulty_rank']:>9.0f}  {row['dropped_share']:>7.0%}"
                     f"  {row['mean_rouge_l']:>12.3f}  {row['mean_ce_loss']:>7.3f}")
    chance = summary["dropped_rows"] / summary["rows"] if summary["rows"] else 0.0
    lines += ["", f"Noisy pairs in the dropped part (chance: {chance:.0%}):"]
    names = {"difficulty_rank": "fused (SRD)", "rank_rouge_l": "ROUGE-L alone", "rank_ce_loss": "cross-entropy alone"}
    for column, row in summary["by_ranking"].items():
        recall = "n/a" if row["noisy_recall"] is None else f"{row['noisy_recall']:.0%}"
        precision = "n/a" if row["noisy_precision"] is None else f"{row['noisy_precision']:.0%}"
        lines.append(f"  {names[column]:<20} {row['noisy_dropped']:>4} of {summary['noisy_rows']} noisy pairs dropped ({recall}); "
                     f"{precision} of the dropped part is noise")
    lines.append(f"Rank agreement of ROUGE-L and cross-entropy (Spearman): {summary['rank_agreement']:.2f}")
    return "\n".join(lines)
