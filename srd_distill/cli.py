"""The ``srd-distill`` command line: it parses arguments and calls :func:`srd_distill.train.train`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from srd_distill.errors import TrainingInterrupted
from srd_distill.losses import LOSS_FORMULAS, LOSS_NAMES, T2_SCALING_MODES
from srd_distill.schedules import PRESETS
from srd_distill.train import BASELINE_EPOCHS, TrainingSetupError, TrainSettings
from srd_distill.train import train as run_training

EXAMPLE = """
\b
Examples:
  # SRD: 3 curriculum stages exported by `srdata export runs/dolly`
  srd-distill train --teacher ./gpt2-xl-sft --student ./gpt2 \\
      --curriculum runs/dolly/curriculum --output runs/kd-rkl \\
      --loss rkl --schedule paper-gpt2 --eval-file dev.jsonl
\b
  # the full-data baseline: same loss and optimizer, 20 epochs on every row
  srd-distill train --teacher ./gpt2-xl-sft --student ./gpt2 \\
      --data runs/dolly/annotated.parquet --output runs/kd-rkl-full --loss rkl
\b
  # a smoke run: 2 steps per stage, small batches, messages and the bar show what happens
  srd-distill train --teacher T --student S --curriculum OUT --output /tmp/smoke \\
      --epochs 1 --max-steps 2 --batch-size 4 --log-every 1
\b
Memory: the loss is computed from hidden states a chunk of tokens at a time (no
full-vocabulary logits; --no-fused-head turns it off). What remains is mostly the
student's activations, proportional to the tokens of one forward pass, which
--micro-batch-tokens caps (default 2048; same step, split in parts);
--gradient-checkpointing cuts them again several-fold for more compute. GPUs: bfloat16
autocast by default. Figures: benchmarks/README.md (bench_distill.py).
"""

_LOSS_HELP = "; ".join(f"{name}: {LOSS_FORMULAS[name]}" for name in LOSS_NAMES)


def _default(name: str) -> Any:
    """The default of a setting, from TrainSettings: the one place defaults are defined."""
    return TrainSettings.model_fields[name].default


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="srdata")
def main() -> None:
    """srd-distill: knowledge distillation on an SRD curriculum (easy to hard), or on all data.

    Example: srd-distill train --teacher T --student S --curriculum runs/a/curriculum --output runs/kd
    """


@main.command(epilog=EXAMPLE)
@click.option("--teacher", required=True, help="Teacher (frozen): a save_pretrained folder or hub id. Example: --teacher ./gpt2-xl-sft")
@click.option("--student", required=True, help="Student to train, sharing the teacher's tokenizer. Example: --student ./gpt2")
@click.option("--curriculum", help="Folder written by `srdata export` (stage-K.parquet + curriculum.json). Example: --curriculum runs/dolly/curriculum")
@click.option("--data", help="Full-data baseline instead of a curriculum: .parquet/.jsonl/.json with prompt_text/reference_text "
              "(e.g. srdata's annotated.parquet) or prompt/response columns. Example: --data runs/dolly/annotated.parquet")
@click.option("--output", "-o", required=True, help="Run folder: stage-N/ checkpoints, metrics.jsonl, run.json. Example: --output runs/kd")
@click.option("--loss", type=click.Choice(LOSS_NAMES), default=_default("loss"), show_default=True,
              help=f"KD divergence D_T with p = teacher, q = student ({_LOSS_HELP}). Example: --loss rkl")
@click.option("--schedule", default=_default("schedule"), show_default=True,
              help=f"Per-stage epochs, kd_ratio, temperature: {' | '.join(PRESETS)} or a YAML/TOML/JSON file. Example: --schedule pocl")
@click.option("--epochs", help="Curriculum: epochs of every stage ('2') or of each ('8,8,4'), overriding the schedule; "
              f"baseline: epochs on the full data [default: {BASELINE_EPOCHS}]. Example: --epochs 2")
@click.option("--kd-ratio", type=float, help="Baseline only: weight of the KD term [default: the schedule's first stage]. Example: --kd-ratio 0.9")
@click.option("--temperature", type=float, help="Baseline only: KD temperature [default: the schedule's first stage]. Example: --temperature 1.0")
@click.option("--t2-scaling", type=click.Choice(T2_SCALING_MODES), default=_default("t2_scaling"), show_default=True,
              help="Multiply D_T by T^2: all losses, only fkl/jsd/srkl as the reference code (reference), or none. Example: --t2-scaling reference")
@click.option("--lr", type=float, default=_default("lr"), show_default=True, help="Peak learning rate (AdamW, cosine decay). Example: --lr 5e-5")
@click.option("--weight-decay", type=float, default=_default("weight_decay"), show_default=True, help="AdamW weight decay (matrices only). Example: --weight-decay 0")
@click.option("--warmup-steps", type=int, default=_default("warmup_steps"), show_default=True, help="Linear warm-up steps per stage. Example: --warmup-steps 100")
@click.option("--grad-clip", type=float, default=_default("grad_clip"), show_default=True, help="Max gradient norm; 0 turns clipping off. Example: --grad-clip 0.5")
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True, help="Rows per optimizer step. Example: --batch-size 32")
@click.option("--grad-accum", type=int, default=_default("grad_accum"), show_default=True,
              help="Split each step's batch into this many micro-batches (less memory, same step). Example: --grad-accum 4")
@click.option("--micro-batch-tokens", type=int, default=_default("micro_batch_tokens"), show_default=True,
              help="Most padded tokens per forward pass: a step with more runs as several micro-batches whose gradients add up "
              "to the same step (bounded activation memory); 0 = no cap. Example: --micro-batch-tokens 8192")
@click.option("--max-length", type=int, default=_default("max_length"), show_default=True, help="Most tokens of prompt + reference. Example: --max-length 1024")
@click.option("--seed", type=int, default=_default("seed"), show_default=True, help="Random seed (stage s uses seed + s). Example: --seed 1")
@click.option("--device", default=_default("device"), show_default=True, help="auto | cpu | cuda | cuda:N. Example: --device cuda:1")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=_default("dtype"), show_default=True,
              help="Compute precision (autocast; float32 master weights); auto = bfloat16 on GPU, float32 on CPU. Example: --dtype float32")
@click.option("--teacher-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=_default("teacher_dtype"), show_default=True,
              help="Teacher weights; auto = its saved dtype (float16 on a CPU, or bfloat16 on a CPU without native bfloat16, "
              "upcast to float32). Example: --teacher-dtype float32")
@click.option("--save-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=_default("save_dtype"), show_default=True,
              help="Checkpoint weights; auto = the student's saved dtype (bfloat16 in, bfloat16 out). Example: --save-dtype float32")
@click.option("--fused-head/--no-fused-head", default=_default("fused_head"), show_default=True,
              help="Compute the loss from the last hidden states, projecting a chunk of scored tokens at a time through "
              "both LM heads: no full-vocabulary logits (models whose logits cannot be reproduced so fall back, with the reason printed).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute the student's activations in the backward pass: "
              "much less memory for one more forward pass of the student per step.")
@click.option("--eval-file", help="Held-out .parquet/.jsonl (same columns as --data): ROUGE-L of greedy answers every epoch; "
              "the best epoch of each stage is kept. Example: --eval-file dev.jsonl")
@click.option("--eval-max-new-tokens", type=int, default=_default("eval_max_new_tokens"), show_default=True, help="Most tokens generated per eval answer. Example: --eval-max-new-tokens 128")
@click.option("--max-steps", type=int, help="At most this many optimizer steps per stage (smoke tests). Example: --max-steps 10")
@click.option("--log-every", type=int, default=_default("log_every"), show_default=True, help="Write a metrics.jsonl line every N steps. Example: --log-every 1")
@click.option("--stop-after-stage", type=int, help="Stop once this stage is finished; rerun without it to continue. Example: --stop-after-stage 0")
@click.option("--overwrite", is_flag=True, help="Start over in an output folder that holds a run with other settings.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
def train(quiet: bool, **flags: Any) -> None:
    """Distil TEACHER into STUDENT stage by stage on an SRD curriculum, or on --data (the baseline).

    Each stage starts from the previous stage's checkpoint with a fresh AdamW and cosine
    schedule. Rerunning the same command resumes after the last finished stage.
    """
    echo = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    if quiet:
        from srdata.cli import silence_library_progress

        silence_library_progress()
    try:
        result = run_training(flags, progress=not quiet, echo=echo)
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) if isinstance(interrupt, TrainingInterrupted) else (
            f"interrupted: finished stages are saved in {flags.get('output')}; run the same command again to "
            "resume after the last finished stage")
        click.echo(f"\n{message}", err=True)
        sys.exit(130)
    except (TrainingSetupError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    if not quiet:
        last = result.stages[-1] if result.stages else None
        state = "finished" if result.complete else "stopped early"
        click.echo(f"{state}: {len(result.stages)} stage(s) in {result.output}" + (f"; last checkpoint {last.checkpoint}" if last else ""))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
