"""Collect the deprecation notices a block of code gets from transformers.

transformers announces deprecations two ways: ``warnings.warn`` (FutureWarning,
DeprecationWarning) and its own logger (``logger.warning_once("... is deprecated ...")``),
which does not propagate to the root logger and shows a message once per process. Both
are collected here, with the once-per-process memory cleared first.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

DEPRECATION_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
DEPRECATION_WORDS = ("deprecat", "legacy", "will be removed", "no longer supported")


@contextlib.contextmanager
def deprecation_notices(
    packages: tuple[str, ...] = ("transformers",), callers: tuple[str, ...] = ("srdata", "srd_distill")
) -> Iterator[list[str]]:
    """Yield a list that holds, after the block, every deprecation notice from ``packages``.

    Warnings raised with ``stacklevel=2`` name the calling file, so deprecation warnings
    attributed to ``callers`` (our own code calling ``packages``) count too.

    Example:
        >>> with deprecation_notices() as notices:      # doctest: +SKIP
        ...     model.generate(...)
        >>> assert not notices, notices                  # doctest: +SKIP
    """
    from transformers.utils import logging as hf_logging

    notices: list[str] = []
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in packages]
    for logger in loggers:
        logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # a notice already shown in this process would be hidden
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notices
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    for w in caught:
        path = w.filename.replace("\\", "/")
        if issubclass(w.category, DEPRECATION_CATEGORIES) and any(f"/{p}/" in path for p in packages + callers):
            notices.append(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})")
    for record in records:
        message = record.getMessage()
        if any(word in message.lower() for word in DEPRECATION_WORDS):
            notices.append(f"{record.name} {record.levelname}: {message}")
