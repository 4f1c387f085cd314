"""The ``srdata`` command line: it parses arguments and calls the library, nothing more."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from srdata.config import BatchingConfig, GenerationConfig, MetricsConfig, ModelConfig, PromptConfig, RunConfig, merge, nest, read_config_file

EXAMPLE = """
\b
Example:
  srdata score data/train.jsonl --model ./student --output runs/student-a \\
      --max-new-tokens 128 --shard-size 500
  srdata export runs/student-a            # 4 stages, keep the easiest 3
"""


def silence_library_progress() -> None:
    """``--quiet`` means quiet: no progress bars or info logs from datasets and transformers either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def _default(section: type, name: str) -> str:
    default = section.model_fields[name].default
    return f" [default: {default}]" if default is not None else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="srdata")
def main() -> None:
    """srdata: curate distillation data with Selective Reflection Distillation (SRD).

    The student answers every training prompt; each pair gets ROUGE-L and the student's
    cross-entropy; the two rankings are fused and the data is split easy-to-hard.
    """


@main.command(epilog=EXAMPLE)
@click.argument("dataset")
@click.option("--model", help="The student: a folder saved with save_pretrained, or a hub id.")
@click.option("--output", "-o", help="Run folder for annotated.parquet, manifest.json and shards/.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/TOML/JSON file with the same settings; flags override it.")
@click.option("--split", help="Dataset split (hub datasets and save_to_disk folders). [default: train]")
@click.option("--prompt-column", help="Column with the instruction/prompt (auto-detected when omitted).")
@click.option("--response-column", help="Column with the reference response (auto-detected when omitted).")
@click.option("--input-column", help="Optional context/input column (alpaca's ### Input block).")
@click.option("--limit", type=int, help="Score only the first N rows.")
@click.option("--template", help="auto | alpaca | raw | chat | a format string with {column} fields; auto = chat when the tokenizer has a chat template, else alpaca. [default: auto]")
@click.option("--max-prompt-tokens", type=int, help="Longer prompts are truncated and flagged." + _default(PromptConfig, "max_prompt_tokens"))
@click.option("--max-reference-tokens", type=int, help="Longer references are cut and flagged." + _default(PromptConfig, "max_reference_tokens"))
@click.option("--truncation-side", type=click.Choice(["left", "right"]), help="left keeps the prompt's end (next to the answer); right keeps its start, as the SRD reference. [default: left]")
@click.option("--eos-token", help="End-of-sequence token to use when the tokenizer has none.")
@click.option("--backend", type=click.Choice(["auto", "hf", "vllm"]), help="auto = vllm when importable and a GPU is visible, else hf. [default: auto]")
@click.option("--device", help="auto | cpu | cuda | cuda:N. [default: auto]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="auto = bfloat16 on GPU, float32 on CPU. [default: auto]")
@click.option("--max-new-tokens", type=int, help="Most tokens the student generates." + _default(GenerationConfig, "max_new_tokens"))
@click.option("--no-repeat-ngram-size", type=int, help="Ban repeated n-grams while generating (the SRD reference used 6).")
@click.option("--batch-size", type=int, help="Most rows per forward pass." + _default(BatchingConfig, "batch_size"))
@click.option("--token-budget", type=int, help="Most padded tokens per forward pass." + _default(BatchingConfig, "token_budget"))
@click.option("--shard-size", type=int, help="Rows per resumable shard." + _default(BatchingConfig, "shard_size"))
@click.option("--rouge-tokenizer", type=click.Choice(["default", "unicode"]), help="default = exactly rouge-score; unicode also scores non-Latin text (deviates from rouge-score). [default: default]")
@click.option("--rrf-k", type=int, help="Reciprocal rank fusion constant." + _default(MetricsConfig, "rrf_k"))
@click.option("--signals", metavar="NAME,...", help="Extra per-row signals: ifd adds ce_loss_uncond (the reference's cross-entropy after the template's empty prompt), ifd (ce_loss / ce_loss_uncond) and pmi (nats the prompt saves on the reference), for `--rank-by noisy`; one more forward pass over the reference tokens. [default: none]")
@click.option("--on-invalid", type=click.Choice(["error", "skip", "flag"]), help="What to do with rows that cannot be scored (null or empty prompt, ...). [default: error]")
@click.option("--seed", type=int, help="Random seed." + _default(RunConfig, "seed"))
@click.option("--overwrite", is_flag=True, default=None, help="Start over in an output folder that holds a run with other settings.")
@click.option("--gpu-memory-utilization", type=float, help="vLLM: share of GPU memory for the engine." + _default(ModelConfig, "gpu_memory_utilization"))
@click.option("--max-model-len", type=int, help="vLLM: context length of the engine.")
@click.option("--max-num-batched-tokens", type=int, help="vLLM: tokens per engine step (lower it if prompt log-probs run out of memory).")
@click.option("--tensor-parallel-size", type=int, help="vLLM: GPUs per model replica. [default: 1]")
@click.option("--engine", type=click.Choice(["local", "ray"]), help="local = this process; ray = a pool of Ray actors (pip install 'srdata[ray]'). Same output either way. [default: local]")
@click.option("--ray-address", help="Ray: cluster to join (auto, HOST:6379, ray://HOST:10001). [default: RAY_ADDRESS, else a Ray already running on this machine, else a new local one]")
@click.option("--num-replicas", type=int, help="Ray: scoring actors, each holding one model. [default: as many as the cluster fits]")
@click.option("--gpus-per-replica", type=float, help="Ray: GPUs per actor (vLLM: the tensor-parallel size). [default: 0]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
def score(dataset: str, config_file: str | None, quiet: bool, **flags: Any) -> None:
    """Annotate DATASET with the student's output, ROUGE-L, cross-entropy and SRD ranks.

    DATASET is a .jsonl/.json/.parquet/.csv file (or several, comma-separated), a
    save_to_disk folder, or a Hugging Face hub id. Re-running the same command resumes:
    finished shards are kept.
    """
    from srdata.pipeline import score as run_score

    given = {key: value for key, value in flags.items() if value is not None}
    given["dataset"] = dataset
    if quiet:
        silence_library_progress()
    try:
        settings = merge(read_config_file(config_file), nest(given)) if config_file else nest(given)
        for section, key, flag in (("model", "model", "--model"), ("run", "output", "--output")):
            if key not in settings.get(section, {}):
                raise click.UsageError(f"{flag} is required (on the command line or in --config)")
        result = run_score(settings, progress=not quiet, echo=None if quiet else click.echo)
    except KeyboardInterrupt:
        output = settings.get("run", {}).get("output", "the output folder")
        click.echo(f"\ninterrupted: the finished shards are saved in {output}; run the same command again to resume", err=True)
        sys.exit(130)
    except click.UsageError:
        raise
    except (ValueError, FileNotFoundError, OSError) as err:
        raise click.ClickException(str(err)) from err
    counts = result.manifest["counts"]
    if not quiet:
        click.echo(
            f"scored {counts['rows_scored']} rows"
            + (f", {counts['rows_skipped']} skipped" if counts["rows_skipped"] else "")
            + (f", {counts['rows_flagged']} flagged" if counts["rows_flagged"] else "")
            + f"; next: srdata export {result.output}"
        )


@main.command()
@click.option("--output", "-o", default="runs/demo", show_default=True, help="Run folder for the demo.")
@click.option("--rows", "--pairs", "rows", default=600, show_default=True, help="Training pairs of the testbed to score (10% noisy).")
@click.option("--warmup-steps", default=300, show_default=True, help="Warm-up steps of the tiny student before it scores.")
@click.option("--seed", default=0, show_default=True, help="Seed of the testbed and of the student.")
def demo(output: str, rows: int, warmup_steps: int, seed: int) -> None:
    """SRD on a controlled testbed: known task difficulty and known noisy pairs (offline, ~1 min, no GPU).

    A tiny character-level student scores synthetic instruction pairs (copy, reverse, shift,
    sort at 4 difficulty levels, 10% with wrong responses); the summary shows the
    difficulty ranks tracking the known level and the noisy pairs landing in the dropped
    quarter. Example: srdata demo --output runs/demo
    """
    from srdata.demo.walkthrough import run_demo

    try:
        run_demo(output, train_pairs=rows, warmup_steps=warmup_steps, seed=seed, echo=click.echo)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err


def _register_optional_commands() -> None:
    """Curriculum commands live in their own module; they register here when present."""
    try:
        from srdata import cli_curriculum
    except ImportError:
        return
    for name in ("export", "rank", "report", "inspect"):
        command = getattr(cli_curriculum, f"{name}_cmd", None) or getattr(cli_curriculum, name, None)
        if isinstance(command, click.Command):
            main.add_command(command, name=name)


_register_optional_commands()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
