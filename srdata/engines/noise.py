"""Keep Ray's own log noise out of srdata's output, as :mod:`srdata.backends.vllm_engine` does for vLLM.

While ``--engine ray`` runs:

* Ray's Python log records pass :class:`KnownRayNoise` (the token-authentication notice a
  local runtime prints); Ray's INFO lines are not shown (``ray.init(logging_level=WARNING)``),
  and the replicas' own output stays in the Ray session's worker logs (``log_to_driver=False``).
* Ray Data's progress and execution logs are gone with Ray Data (the engine uses Ray core).

Ray's other warnings and errors pass.

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

