"""The errors ``srd-distill`` raises for settings, files and models it cannot train with.

Each message says what is wrong and what to do; the CLI prints it as is.

Example:
    >>> str(TrainingSetupError("batch_size must be >= 1"))
    'batch_size must be >= 1'
"""

from __future__ import annotations

__all__ = ["TrainingSetupError", "TokenizerMismatchError", "CurriculumFilesError", "RunFolderError", "TrainingInterrupted"]


class TrainingSetupError(ValueError):
    """Settings, files or models that cannot be trained with; the message says why and what to do."""


class TokenizerMismatchError(TrainingSetupError):
    """Teacher and student do not share one tokenizer (KD compares them token by token)."""


class CurriculumFilesError(TrainingSetupError):
    """The curriculum folder lacks files the schedule needs."""


class RunFolderError(TrainingSetupError):
    """The output folder holds a run that cannot be resumed with these settings."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what is saved and that re-running the same command resumes."""
