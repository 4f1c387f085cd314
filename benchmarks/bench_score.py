"""Benchmark ``srdata.score`` against a reference-style scoring loop on real T0 rows.

Usage:
    python benchmarks/bench_score.py                          # both models, defaults below
    python benchmarks/bench_score.py --model small --rows 1000 --max-new-tokens 32
    python benchmarks/bench_score.py --model 124m --rows-124m 64 --max-new-tokens-124m 32
    python benchmarks/bench_score.py --model both --rows 5000 --rows-124m 1000 \
        --max-new-tokens 256 --max-new-tokens-124m 256 --tuned 128:32768   # a bigger rerun

Both arms run in the same process on the same rows of ``../shared/data/t0-train.parquet``
(columns template, prompt, response; by default a seeded random sample of ``--rows`` rows
kept in file order, ``--select head`` takes the first rows instead), with the same model
weights, the same alpaca prompts and the same token ids (``srdata.steps.tokenize.encode_pairs``
with srdata's default limits: 256 prompt tokens cut on the left, 256 reference tokens):

* **reference-style** (what the SRD authors' code does): rows in input order, batches of
  ``--ref-batch-size`` (16); per batch one right-padded teacher-forced forward pass
  ``model(input_ids, attention_mask).logits``, ``log_softmax`` over the full vocabulary in
  float32 and a masked mean over the reference tokens, then one greedy ``model.generate``
  call with left padding. Timed from rendering the prompts to the decoded answers.
* **srdata**: ``srdata.score(...)`` with its default batching (batch_size 64, token
  budget 16384) and, unless ``--tuned none``, once more with a tuned setting. Throughput
  uses the manifest's ``scoring_seconds`` (render, tokenize, CE, generate, decode and
  ROUGE-L; model/dataset load and parquet writing excluded); the wall time of the whole
  call, load included, is printed alongside.

On a small machine shared with other work, ``--threads 1`` gives steadier figures: two
torch threads on two busy cores stall each other at every parallel region (measured here:
a 124M forward ran at 50 GFLOP/s with 2 threads, 75-80 with 1).

Model load time is excluded from both arms. Before timing, one untimed warm-up (a CE
forward and a 4-token generate on the first 16 rows) runs, so neither arm pays torch's
first-call costs. Each arm then runs once.

tokens = prompt + reference + generated tokens (generated: up to, not including, the
first EOS), the same count for both arms. GFLOP/s = 2 x non-embedding parameters x
forward tokens / seconds, with forward tokens = the tokens each arm must run, padding not
counted: the reference arm runs every prompt twice (prompt + reference for CE, prompt +
generated for generation); srdata runs it once (its backend shares each prompt's prefill
between scoring and generation), so its forward tokens = prompt + reference + generated
and its rows/s gain is partly less work, not only faster work; a second
figure adds the LM head that is actually needed (2 x hidden x vocab per reference and
generated token). Both arms compute in ``--dtype`` (``auto``: srdata's rule on this CPU,
bfloat16 with AMX or AVX512-BF16); "% of peak" is against the peak of that dtype: the best of
``--peak-reps`` 2048x2048 ``torch.matmul`` calls in float32 and in bfloat16, measured at the
start and the end of the run (best of both).

Models: ``small`` and ``124m`` are random-weight GPT-2s with a byte-level BPE tokenizer
trained on the T0 text (``srdata.demo.tiny.build_tiny_model``), cached under
``--cache-dir`` by their shape, scored with the alpaca template. ``smollm2``
(SmolLM2-135M-Instruct: Llama layout, 30 layers, 49k vocabulary) and ``qwen-0.5b``
(Qwen2.5-Coder-0.5B-Instruct: Qwen2 layout, 24 layers, 152k vocabulary) are REAL pretrained
students built from registry wheels by ``tests/real_models.py`` (cached in
``~/.cache/srdata/models``), scored with their chat template (``--template chat``), as a
user of an instruct model would. ``--model real`` runs both real models, ``all`` every model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peaks import best_peaks, cpu_line, matmul_peaks  # noqa: E402  (this folder)
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "t0-train.parquet"

MODELS = {
    # name: (hidden, layers, heads, vocab)
    "small": (256, 2, 4, 8000),
    "124m": (768, 12, 12, 50257),
}
REAL_MODELS = ("smollm2", "qwen-0.5b")  # keys of tests/real_models.py
CHOICES = {"both": ["small", "124m"], "real": list(REAL_MODELS), "all": ["small", "124m", *REAL_MODELS]}


def load_frame(path: Path):
    if not path.is_file():
        sys.exit(
            f"bench_score: real data file {path} is absent.\n"
            "It ships in the shared data folder beside the repository "
            "(../shared/data/t0-train.parquet, columns template/prompt/response); pass --data PATH to use another copy."
        )
    import polars as pl

    frame = pl.read_parquet(path)
    missing = [c for c in ("prompt", "response") if c not in frame.columns]
    if missing:
        sys.exit(f"bench_score: {path} lacks column(s) {', '.join(missing)} (has {', '.join(frame.columns)})")
    return frame


def sample_rows(frame, n: int, select: str, seed: int, cache: Path) -> Path:
    """Write the benchmark rows to a parquet file under ``cache`` and return its path."""
    import random

    n = min(n, frame.height)
    if select == "head":
        index = list(range(n))
    else:  # a seeded random sample, kept in the file's order
        index = sorted(random.Random(seed).sample(range(frame.height), n))
    path = cache / f"t0-{select}-{n}-seed{seed}.parquet"
    if not path.is_file():
        frame[index].write_parquet(path)
    return path


def build_model(name: str, cache: Path, frame) -> Path:
    if name in REAL_MODELS:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.real_models import build_real_model

        return build_real_model(name)
    hidden, layers, heads, vocab = MODELS[name]
    path = cache / f"gpt2-h{hidden}-l{layers}-a{heads}-v{vocab}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    from srdata.demo.tiny import build_tiny_model

    texts = (frame["prompt"] + "\n" + frame["response"]).to_list()
    t0 = time.perf_counter()
    build_tiny_model(path, texts, "gpt2", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads)
    print(f"  built {path} in {time.perf_counter() - t0:.1f} s (tokenizer trained on all {len(texts):,} T0 rows)")
    return path


def param_counts(model) -> tuple[int, int, int]:
    """(non-embedding parameters, hidden size, vocabulary size)."""
    embedding_ids = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None for p in m.parameters()}
    for name, module in model.named_modules():
        if name.endswith(("wpe", "embed_positions")):
            embedding_ids |= {id(p) for p in module.parameters()}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    return non_embedding, model.config.hidden_size, model.config.vocab_size


def template_of(name: str) -> str:
    return "chat" if name in REAL_MODELS else "alpaca"


def render_and_encode(rows: dict, tokenizer, template: str = "alpaca"):
    """Prompts and token ids exactly as ``srdata.score`` makes them (default limits)."""
    from srdata.config import PromptConfig
    from srdata.steps.dataset import resolve_columns
    from srdata.steps.prompts import chat_affixes, render_rows
    from srdata.steps.tokenize import encode_pairs

    mapping = resolve_columns(list(rows))
    defaults = PromptConfig()
    rendered = render_rows(rows, mapping, template, tokenizer)
    bad = [r.invalid_reason for r in rendered if r.invalid_reason]
    if bad:
        sys.exit(f"bench_score: {len(bad)} benchmark rows are invalid ({bad[0]}); pick other rows")
    pairs = encode_pairs(
        tokenizer, [r.prompt_text for r in rendered], [r.reference for r in rendered],
        max_prompt_tokens=defaults.max_prompt_tokens, max_reference_tokens=defaults.max_reference_tokens,
        truncation_side=defaults.truncation_side, add_special_tokens=template != "chat",
        keep=chat_affixes(tokenizer) if template == "chat" else ("", ""),
    )
    return pairs


class ReferenceLoop:
    """The SRD authors' way: input order, fixed batches, full-logit CE, one generate per batch."""

    def __init__(self, model, tokenizer, batch_size: int, max_new_tokens: int, template: str = "alpaca"):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.batch_size, self.template = model, tokenizer, batch_size, template
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.gen_config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, no_repeat_ngram_size=0,
            eos_token_id=[self.eos], pad_token_id=self.pad,
        )
        self.seconds = {"ce": 0.0, "generate": 0.0}
        self.padded = {"ce": 0, "generate": 0}

    def ce(self, prompts, references) -> list[float]:
        import torch

        seqs = [p + r for p, r in zip(prompts, references)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ref_mask = torch.zeros_like(ids, dtype=torch.float32)  # 1 where the *target* token is a reference token
        for i, (p, r) in enumerate(zip(prompts, references)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
            ref_mask[i, len(p) : len(p) + len(r)] = 1
        self.padded["ce"] += ids.numel()
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
            token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
            target_mask = ref_mask[:, 1:]
            ce = -(token_logp * target_mask).sum(1) / target_mask.sum(1)
        return ce.tolist()

    def generate(self, prompts, max_new_tokens: int | None = None) -> list[list[int]]:
        import torch

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        config = self.gen_config
        if max_new_tokens is not None:
            config = type(config)(**{**config.to_dict(), "max_new_tokens": max_new_tokens})
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        self.padded["generate"] += out.numel()
        generated = []
        for row in out[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t == self.eos), None)
            generated.append(row if stop is None else row[:stop])
        return generated

    def run(self, rows: dict) -> tuple[list[float], list[list[int]], list[str], list]:
        pairs = render_and_encode(rows, self.tokenizer, self.template)
        ces, gens = [], []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            prompts = [p.prompt_ids for p in batch]
            t0 = time.perf_counter()
            ces += self.ce(prompts, [p.reference_ids for p in batch])
            t1 = time.perf_counter()
            gens += self.generate(prompts)
            self.seconds["ce"] += t1 - t0
            self.seconds["generate"] += time.perf_counter() - t1
        texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gens]
        return ces, gens, texts, pairs


@contextlib.contextmanager
def time_backend_calls(into: dict):
    """Accumulate the seconds srdata's HF backend spends scoring + generating, and generating alone.

    ``score_and_generate`` shares each prompt's prefill between the two, so "CE" here is
    the call's time minus the time in decoding (``greedy_decode`` on the shared prefill,
    ``_generate_batch`` for separate passes). The one-off shared-prefill check (its own
    scoring and decoding on made-up rows, on a float32 copy for 16-bit models) is counted
    apart as "check", so CE and decode are the rows' own.
    """
    import srdata.backends.hf as hf_module
    from srdata.backends.hf import HFBackend

    originals = {
        "both": HFBackend.score_and_generate, "generate": HFBackend._generate_batch, "decode": hf_module.greedy_decode,
        "check": HFBackend._shared_prefill_matches,
    }
    checking = [0]  # depth of _shared_prefill_matches calls (the float32 copy's check runs inside the model's)

    def wrap(key, fn):
        def timed(self, *args, **kwargs):
            if checking[0] and key != "check":
                return fn(self, *args, **kwargs)
            checking[0] += key == "check"
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                checking[0] -= key == "check"
                if not checking[0]:
                    into[key] = into.get(key, 0.0) + time.perf_counter() - t0
        return timed

    HFBackend.score_and_generate = wrap("both", originals["both"])
    HFBackend._generate_batch = wrap("generate", originals["generate"])
    HFBackend._shared_prefill_matches = wrap("check", originals["check"])
    # the shared-prefill path decodes with greedy_decode (a plain function: wrapped without a self)
    hf_module.greedy_decode = wrap("generate", lambda _self, *args, **kwargs: originals["decode"](_self, *args, **kwargs))
    try:
        yield into
    finally:
        HFBackend.score_and_generate, HFBackend._generate_batch = originals["both"], originals["generate"]
        HFBackend._shared_prefill_matches, hf_module.greedy_decode = originals["check"], originals["decode"]
        into["ce"] = into.get("both", 0.0) - into.get("generate", 0.0) - into.get("check", 0.0)


def run_srdata(dataset: Path, model: Path, output: Path, max_new_tokens: int, template: str, dtype: str, **batching):
    import shutil

    import srdata

    # a fresh folder: srdata resumes (skips) finished shards of a run with the same settings
    shutil.rmtree(output, ignore_errors=True)
    split: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    with time_backend_calls(split):
        result = srdata.score(
            dataset=str(dataset), model=str(model), output=str(output), max_new_tokens=max_new_tokens,
            device="cpu", dtype=dtype, overwrite=True, progress=False, template=template, **batching,
        )
    wall = time.perf_counter() - t0
    split["cpu"] = time.process_time() - c0
    return result, wall, split


def bench_model(name: str, args, frame, cache: Path, results: list, notes: list) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    real = name in REAL_MODELS
    n_rows = {"small": args.rows, "124m": args.rows_124m}.get(name, args.rows_real)
    max_new = {"small": args.max_new_tokens, "124m": args.max_new_tokens_124m}.get(name, args.max_new_tokens_real)
    template = template_of(name)
    if real:
        print(f"\n== {name}: real pretrained student, template {template}; {n_rows} rows, max_new_tokens {max_new}")
    else:
        hidden, layers, heads, vocab = MODELS[name]
        print(f"\n== {name}: GPT-2 {layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}; "
              f"{n_rows} rows, max_new_tokens {max_new}")
    model_path = build_model(name, cache, frame)
    data_path = sample_rows(frame, n_rows, args.select, args.seed, cache)
    import polars as pl

    rows = pl.read_parquet(data_path).to_dict(as_series=False)
    n_rows = len(rows["prompt"])

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval()  # both arms: one dtype
    n_nonemb, d_model, v = param_counts(model)
    print(f"  non-embedding parameters {n_nonemb / 1e6:.2f} M, all parameters {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    print(f"  architecture {model.config.model_type}, {model.config.num_hidden_layers} layers, hidden {d_model}, vocab {v}")
    ref = ReferenceLoop(model, tokenizer, args.ref_batch_size, max_new, template)
    # untimed warm-up: one CE forward and a 4-token generate on the first batch
    warm = render_and_encode({k: v_[: args.ref_batch_size] for k, v_ in rows.items()}, tokenizer, template)
    ref.ce([p.prompt_ids for p in warm], [p.reference_ids for p in warm])
    ref.generate([p.prompt_ids for p in warm], max_new_tokens=4)
    ref.seconds = {"ce": 0.0, "generate": 0.0}
    ref.padded = {"ce": 0, "generate": 0}

    t0, c0 = time.perf_counter(), time.process_time()
    ref_ce, ref_gens, ref_texts, pairs = ref.run(rows)
    ref_seconds = time.perf_counter() - t0
    ref.seconds["cpu"] = time.process_time() - c0
    del model

    prompt_tokens = sum(len(p.prompt_ids) for p in pairs)
    ref_tokens_in = sum(len(p.reference_ids) for p in pairs)

    def figures(label, seconds, generated, split, padded, wall=None, extra="", prompts_run=2):
        tokens = prompt_tokens + ref_tokens_in + generated
        # the reference arm runs every prompt twice (CE pass, generate); srdata once
        forward_tokens = prompts_run * prompt_tokens + ref_tokens_in + generated
        gflop = 2 * n_nonemb * forward_tokens / 1e9
        gflop_head = gflop + 2 * d_model * v * (ref_tokens_in + generated) / 1e9
        decode = 2 * (n_nonemb + d_model * v) * generated / 1e9 / split["generate"] if prompts_run == 1 and split.get("generate") else None
        results.append(dict(
            model=name, arm=label, rows=n_rows, seconds=seconds, wall=wall, rows_s=n_rows / seconds,
            tok_s=tokens / seconds, gflops=gflop / seconds, gflops_head=gflop_head / seconds,
            ce_s=split.get("ce"), gen_s=split.get("generate"), check_s=split.get("check"), cpu_s=split.get("cpu"), padded=padded, extra=extra, gflops_decode=decode,
        ))

    ref_generated = sum(map(len, ref_gens))
    figures(f"reference-style (batch {args.ref_batch_size}, input order)", ref_seconds, ref_generated, ref.seconds,
            ref.padded)

    from srdata.config import BatchingConfig

    defaults = BatchingConfig()
    arms = [(f"srdata defaults (batch_size {defaults.batch_size}, token_budget {defaults.token_budget})", {})]
    tuned = {"small": args.tuned, "124m": args.tuned_124m}.get(name, args.tuned_real)
    if tuned:
        arms.append((f"srdata tuned (batch_size {tuned[0]}, token_budget {tuned[1]})",
                     dict(batch_size=tuned[0], token_budget=tuned[1])))
    from srdata.backends.batching import bucket_batches
    from srdata.backends.batching import prefill_chunks, similar_length_groups

    lengths = [len(p.prompt_ids) + len(p.reference_ids) for p in pairs]
    plens = [len(p.prompt_ids) for p in pairs]
    for k, (label, batching) in enumerate(arms):
        result, wall, split = run_srdata(data_path, model_path, cache / f"run-{name}-{k}", max_new, template, args.dtype, **batching)
        timings = result.manifest["timings"]
        annotated = result.to_polars().sort("srd_id")
        generated = int(annotated["output_tokens"].sum())
        if result.manifest.get("resumed") or int(timings["tokens_this_call"]) != prompt_tokens + ref_tokens_in + generated:
            sys.exit(f"bench_score: srdata run in {result.output} did not score every row afresh ({timings})")
        # the padded token grid srdata's batches form (same rules as srdata.backends.hf):
        # "ce" = the shared prompt prefill plus the reference continuations, grouped by length
        bs, budget = batching.get("batch_size", defaults.batch_size), batching.get("token_budget", defaults.token_budget)
        padded_ce = padded_gen = 0
        for b in bucket_batches(plens, bs, budget, extra=max_new):
            width = max(plens[i] for i in b)
            refs = [lengths[i] - plens[i] for i in b]
            prefill = prefill_chunks([plens[i] - 1 for i in b], 4096)  # HFBackend's prefill_chunk_tokens default
            padded_ce += sum(len(c) * max(plens[b[j]] - 1 for j in c) for c in prefill)
            padded_ce += sum(len(g) * max(refs[j] for j in g) for g in similar_length_groups(refs))
            padded_gen += len(b) * (width + max_new)
        ce = annotated["ce_loss"].to_list()
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ce, ref_ce))
        same = sum(a == b for a, b in zip(annotated["student_output"].to_list(), ref_texts))
        figures(label, timings["scoring_seconds"], generated, split, {"ce": padded_ce, "generate": padded_gen},
                wall=wall, extra=f"ce max rel diff vs reference {rel:.2e}; identical outputs {same}/{n_rows}",
                prompts_run=1)
    useful = {"ce": prompt_tokens + ref_tokens_in, "generate": prompt_tokens + n_rows * max_new}
    notes.append(
        f"{name}: {n_rows} rows, {prompt_tokens:,} prompt + {ref_tokens_in:,} reference tokens "
        f"(mean {prompt_tokens / n_rows:.0f} + {ref_tokens_in / n_rows:.0f}/row), generated {ref_generated:,} "
        f"(reference arm; {sum(len(g) == max_new for g in ref_gens)} rows hit max_new_tokens={max_new}); "
        f"non-embedding params {n_nonemb / 1e6:.2f} M, hidden {d_model}, vocab {v}; "
        f"useful tokens in CE grid {useful['ce']:,}, in generate grid <= {useful['generate']:,}"
    )


def print_table(results: list, peak: float, notes: list) -> None:
    print("\n" + "=" * 118)
    header = (f"{'model':<6} {'arm':<52} {'rows':>5} {'sec':>7} {'rows/s':>7} {'tok/s':>8} {'x ref':>6} "
              f"{'GF/s':>6} {'%pk':>5} {'%pk+hd':>6} {'%pk dec':>7}")
    print(header)
    print("-" * 118)
    base = {}
    for r in results:
        if r["arm"].startswith("reference"):
            base[r["model"]] = r["tok_s"]
        ratio = r["tok_s"] / base[r["model"]]
        print(f"{r['model']:<6} {r['arm']:<52} {r['rows']:>5} {r['seconds']:>7.1f} {r['rows_s']:>7.2f} "
              f"{r['tok_s']:>8,.0f} {ratio:>5.2f}x {r['gflops']:>6.1f} {100 * r['gflops'] / peak:>4.1f}% "
              f"{100 * r['gflops_head'] / peak:>5.1f}% " + (f"{100 * r['gflops_decode'] / peak:>6.1f}%" if r["gflops_decode"] else f"{'-':>7}"))
    print("-" * 118)
    print("time split (wall s) and padding (padded = token slots in the padded batches: CE rows x width "
          "(srdata: shared prompt prefill + reference continuations; its CE time includes that prefill), "
          "generate rows x (prompt width + new tokens)); "
          "CPU-s = process CPU time of the arm, all threads (CPU-s close to threads x wall: the arm got its cores):")
    for r in results:
        wall = f"; whole call incl. model+data load and writes {r['wall']:.1f} s wall" if r["wall"] else ""
        wall += f", {r['cpu_s']:.1f} CPU-s"
        wall += f"; one-off shared-prefill check {r['check_s']:.1f} s" if r.get("check_s") else ""
        print(f"  {r['model']:<6} {r['arm'][:40]:<40} CE {r['ce_s']:6.1f} s, generate {r['gen_s']:6.1f} s; "
              f"padded CE {r['padded']['ce']:,} / generate {r['padded']['generate']:,}{wall}")
        if r["extra"]:
            print(f"  {'':<6} {'':<40} {r['extra']}")
    for note in notes:
        print(f"  {note}")


def parse_tuned(text: str):
    if text.lower() in ("none", "off", ""):
        return None
    bs, _, budget = text.partition(":")
    return int(bs), int(budget or 16384)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="T0 train parquet (template, prompt, response)")
    parser.add_argument("--model", choices=["small", "124m", *REAL_MODELS, *CHOICES], default="both",
                        help="small: 2-layer GPT-2 (hidden 256, vocab 8000); 124m: GPT-2-small size (768/12/12, vocab 50257); "
                             "smollm2 / qwen-0.5b: real pretrained students; both = small + 124m; real = both real; all")
    parser.add_argument("--rows-real", type=int, default=64, help="rows for a real model (default 64)")
    parser.add_argument("--max-new-tokens-real", type=int, default=32, help="real models (default 32)")
    parser.add_argument("--tuned-real", type=parse_tuned, default=None, help="real models: extra srdata run with BATCH:BUDGET")
    parser.add_argument("--rows", type=int, default=1000, help="rows for the small model (default 1000)")
    parser.add_argument("--rows-124m", type=int, default=64, help="rows for the 124M model (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="small model (default 32; srdata's own default is 256)")
    parser.add_argument("--max-new-tokens-124m", type=int, default=32, help="124M model (default 32)")
    parser.add_argument("--ref-batch-size", type=int, default=16, help="reference-style batch size (default 16, as the SRD code)")
    parser.add_argument("--tuned", type=parse_tuned, default=parse_tuned("16:16384"),
                        help="small model: extra srdata run with BATCH:BUDGET (default 16:16384, the smaller "
                             "batches srdata used before; shows the effect of batch size); 'none' to skip")
    parser.add_argument("--tuned-124m", type=parse_tuned, default=None,
                        help="124M model: extra srdata run with BATCH:BUDGET (default none, to save time)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--select", choices=["spread", "head"], default="spread",
                        help="spread: seeded random sample kept in file order (default); head: the first rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-reps", type=int, default=10)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both arms compute in it; %% of peak is against its matmul peak (auto: srdata's rule on this CPU)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/srdata-bench-score"),
                        help="models, row samples and run folders (models are reused between runs)")
    args = parser.parse_args()

    frame = load_frame(args.data)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    import logging

    import torch
    import transformers

    logging.getLogger("srdata").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    started = time.perf_counter()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work; load average "
          f"{os.getloadavg()[0]:.1f} at start), torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"transformers {version('transformers')}, srdata {version('srdata')}, Python {platform.python_version()}")
    if args.dtype == "auto":  # srdata's own rule on this CPU (srdata.backends.dtype)
        from srdata.backends.dtype import resolve_dtype_with_reason

        resolved, reason = resolve_dtype_with_reason("auto", torch.device("cpu"))
        args.dtype = str(resolved).removeprefix("torch.")
        print(f"--dtype auto: {args.dtype} ({reason})")
    print(f"{cpu_line()}; both arms compute in {args.dtype}")
    peak_start = matmul_peaks(args.peak_reps)
    print("matmul peaks at start (best of %d 2048x2048): %s" % (args.peak_reps, ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak_start.items())))

    results: list = []
    notes: list = []
    for name in CHOICES.get(args.model, [args.model]):
        bench_model(name, args, frame, args.cache_dir, results, notes)

    peak_end = matmul_peaks(args.peak_reps)
    peak = best_peaks(peak_start, peak_end)[args.dtype]
    print("\nmatmul peaks at end: " + ", ".join(f"{k} {v:.1f}" for k, v in peak_end.items()) + f" GFLOP/s; peak used ({args.dtype}, best of start and end): {peak:.1f} GFLOP/s; load average at end "
          f"{os.getloadavg()[0]:.1f}; total benchmark time {time.perf_counter() - started:.0f} s")
    print_table(results, peak, notes)
    print("GF/s = 2 x non-embedding params x forward tokens / s (forward tokens: reference arm prompt+reference for CE "
          "and prompt+generated for generate; srdata prompt once + reference + generated; padding not counted); %pk+hd also counts the needed LM head "
          "(2 x hidden x vocab per reference and generated token); %pk dec = srdata's decode steps alone: 2 x (non-embedding params + "
          "hidden x vocab) per generated token / time in its batched decode. %: of the matmul peak of the dtype both arms use. "
          "sec = scoring time, model load excluded.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
