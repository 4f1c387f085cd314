"""Keep Ray's own log noise out of srdata's output, as :mod:`srdata.backends.vllm_engine` does for vLLM.

Dropped while ``--engine ray`` runs: Ray's INFO lines (``Started a local Ray instance``,
``Connecting to existing Ray cluster``), the token-authentication notice of a local
runtime, and the metrics-exporter errors a cluster started without a dashboard or
metrics agent prints on every run. Ray's other warnings and errors pass.

Example:
    >>> import logging
    >>> record = logging.LogRecord("ray", logging.WARNING, "", 0, "Some real problem", None, None)
    >>> KnownRayNoise().filter(record)
    True
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

#: Fragments of Ray messages that say nothing about the run (matched anywhere in the message).
NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Token authentication is disabled for this Ray cluster",
    "Failed to establish connection to the metrics exporter agent",
    "metrics exporter",
    "Metrics will not be exported",
    "Exporting metrics",
    "open_telemetry",
    "opentelemetry",
)


class KnownRayNoise(logging.Filter):
    """Drop Ray log records whose message holds one of :data:`NOISE`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record is not ours to judge)
            return True
        return not any(fragment.lower() in message.lower() for fragment in NOISE)


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """While a Ray run lasts: :class:`KnownRayNoise` on Ray's logger and its handlers."""
    ray_logger = logging.getLogger("ray")
    targets = [*ray_logger.handlers, ray_logger]
    noise = KnownRayNoise()
    for target in targets:
        target.addFilter(noise)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(noise)
