"""The ``srd-distill`` command line: it parses arguments and calls :func:`srd_distill.train.train`.

Every option of ``train`` is generated from a field of :class:`~srd_distill.settings.TrainSettings`'s
sections, as ``srdata score``'s from :class:`~srdata.config.ScoreConfig`; ``--config FILE`` holds
the same settings (YAML, TOML or JSON; flat or in sections) and flags override it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from srd_distill.errors import TrainingInterrupted
from srd_distill.settings import TRAIN_SECTIONS
from srd_distill.train import train as run_training
from srdata.cli import config_options, flag, given_flags
from srdata.config import merge, nest, read_config_file

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
  # KD from the teacher's top-64 cached once (no teacher in memory; tail beyond the top-K is one bucket)
  srdata teach runs/dolly --teacher ./gpt2-xl-sft --top-k 64
  srd-distill train --teacher-logits runs/dolly --student ./gpt2 \\
      --curriculum runs/dolly/curriculum --output runs/kd-rkl-offline --loss rkl
\b
  # the settings in a file (flat keys or sections: models, inputs, objective, optimisation,
  # compute, evaluation, run); flags override it
  srd-distill train --config kd.yaml --lr 5e-5
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

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="srdata")
def main() -> None:
    """srd-distill: knowledge distillation on an SRD curriculum (easy to hard), or on all data.

    Example: srd-distill train --teacher T --student S --curriculum runs/a/curriculum --output runs/kd
    """


@main.command(epilog=EXAMPLE)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML/TOML/JSON file with the same settings; flags override it.")
@config_options(*TRAIN_SECTIONS.values())
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
def train(config_file: str | None, quiet: bool, **flags: Any) -> None:
    """Distil TEACHER (or its cached top-K, --teacher-logits) into STUDENT stage by stage on an SRD curriculum, or on --data.

    Each stage starts from the previous stage's checkpoint with a fresh AdamW and cosine
    schedule. Rerunning the same command resumes after the last finished stage, from the
    next stage's last step checkpoint (--checkpoint-interval). One train per --output at a time.
    """
    try:
        settings = merge(read_config_file(config_file, TRAIN_SECTIONS), nest(given_flags(flags), TRAIN_SECTIONS)) if config_file \
            else nest(given_flags(flags), TRAIN_SECTIONS)
    except (ValueError, OSError) as err:  # a config file that cannot be read, or a setting given twice in it
        raise click.ClickException(str(err)) from err
    models = settings.get("models", {})
    for section, key in (("models", "student"), ("run", "output")):
        if key not in settings.get(section, {}):
            raise click.UsageError(f"{flag(key)} is required (on the command line or in --config)")
    if (models.get("teacher") is None) == (models.get("teacher_logits") is None):  # one of the two, as a usage error
        raise click.UsageError("give --teacher MODEL (run at every step) or --teacher-logits RUN (its top-K cached by "
                               "`srdata teach RUN --teacher MODEL --top-k K`), not both or neither")
    echo = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    if quiet:
        from srdata.cli import silence_library_progress

        silence_library_progress()
    try:
        result = run_training(settings, progress=not quiet, echo=echo)
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) if isinstance(interrupt, TrainingInterrupted) else (
            f"interrupted: finished stages are saved in {settings['run']['output']}; run the same command again to "
            "resume after the last finished stage")
        click.echo(f"\n{message}", err=True)
        sys.exit(130)
    except (ValueError, OSError) as err:
        # User errors: settings, files, a busy or foreign --output, a damaged checkpoint, a full
        # disk (TrainingSetupError, FolderBusyError, IntegrityError, WriteError...): the message
        # names the file and the fix; no traceback.
        raise click.ClickException(str(err)) from err
    if not quiet:
        last = result.stages[-1] if result.stages else None
        state = "finished" if result.complete else "stopped early"
        click.echo(f"{state}: {len(result.stages)} stage(s) in {result.output}" + (f"; last checkpoint {last.checkpoint}" if last else ""))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
