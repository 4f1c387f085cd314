"""Keep Ray's own log noise out of srdata's output, as :mod:`srdata.backends.vllm_engine` does for vLLM.

While ``--engine ray`` runs (:func:`quiet_ray`):

* Ray's Python log records pass :class:`KnownRayNoise` (the token-authentication notice a
  local runtime prints); Ray's INFO lines are not shown (``ray.init(logging_level=WARNING)``),
  and the replicas', raylets' and GCS's output stays in the Ray session's log files
  (``log_to_driver=False``).
* Ray's metrics-exporter errors are written by its C++ core (the driver's own core worker,
  in this process) straight to file descriptor 2, past Python's logging: :func:`filtered_stderr`
  routes descriptor 2 through a pipe and drops whole lines holding one of :data:`NOISE`;
  every other byte (srdata's messages, progress bars, Ray's real errors) passes, unchanged
  and in order.
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
import os
import select
import sys
import threading
from typing import Callable, Iterator

#: Fragments of Ray messages that say nothing about the run (matched anywhere in a message or line, any case).
NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Token authentication is disabled for this Ray cluster",
    # The metrics exporter, as written in Ray's source (github.com/ray-project/ray); the agent is
    # absent or unreachable (no ray[default], a blocked port), so metrics are not exported: nothing
    # srdata computes depends on them.
    # src/ray/core_worker/core_worker_process.cc and src/ray/raylet/main.cc, RAY_LOG(ERROR):
    #   "Failed to establish connection to the metrics exporter agent. " "Metrics will not be exported. "
    #   << "Exporter agent status: " << status  (status: src/ray/rpc/metrics_agent_client.cc,
    #   Status::RpcError("Running out of retries to initialize the metrics agent.", 14))
    "Failed to establish connection to the metrics exporter agent. Metrics will not be exported.",
    # src/ray/gcs/gcs_server.cc, RAY_LOG(ERROR):
    #   "Failed to establish connection to the event+metrics exporter agent. " "Events and metrics will not be exported. "
    "Failed to establish connection to the event+metrics exporter agent. Events and metrics will not be exported.",
    # src/ray/observability/open_telemetry_metric_recorder.cc, RAY_LOG(WARNING):
    #   "Failed to export metrics to the metrics agent. Result: " << static_cast<int>(result)
    "Failed to export metrics to the metrics agent. Result: ",
    # src/ray/stats/metric_exporter.cc (Ray 1.x-2.x, OpenCensus), RAY_LOG(WARNING):
    #   "Export metrics to agent failed: " << status << ". This won't affect Ray, but you can lose metrics from the cluster."
    "Export metrics to agent failed: ",
)
#: How long a partial line that may be a Ray log line (``[time level pid tid] file:line: ...``) is held for its end.
HOLD_SECONDS = 0.2


def is_ray_noise(line: str) -> bool:
    """Whether a message or output line holds one of :data:`NOISE`.

    Example:
        >>> is_ray_noise("[2025-11-04 22:53:14,867 E 766 798] core_worker_process.cc:825: Failed to establish connection to "
        ...              "the metrics exporter agent. Metrics will not be exported. Exporter agent status: RpcError: ...")
        True
        >>> is_ray_noise("Failed to connect to GCS at 10.0.0.1:6379")
        False
    """
    lowered = line.lower()
    return any(fragment.lower() in lowered for fragment in NOISE)


class KnownRayNoise(logging.Filter):
    """Drop Ray log records whose message holds one of :data:`NOISE`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record is not ours to judge)
            return True
        return not is_ray_noise(message)


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """While a Ray run lasts: :class:`KnownRayNoise` on Ray's logger and its handlers, and :func:`filtered_stderr`."""
    ray_logger = logging.getLogger("ray")
    targets = [*ray_logger.handlers, ray_logger]
    noise = KnownRayNoise()
    for target in targets:
        target.addFilter(noise)
    try:
        with filtered_stderr():
            yield
    finally:
        for target in targets:
            target.removeFilter(noise)


@contextlib.contextmanager
def filtered_stderr(is_noise: Callable[[str], bool] = is_ray_noise) -> Iterator[None]:
    """While inside, whole lines written to file descriptor 2 (by Python or by C++ in this process) for which
    ``is_noise`` is true are dropped; everything else reaches the real stderr unchanged and in order.

    A partial line is passed on at once unless it starts like a Ray log line (``[``), which is held
    until its end or :data:`HOLD_SECONDS`; progress bars (``\\r``) are never held. Where descriptor 2
    cannot be redirected, stderr is left as it is. If the forwarding thread fails, it copies the
    rest unfiltered: output is never lost.

    Example:
        >>> with filtered_stderr():       # doctest: +SKIP
        ...     os.write(2, b"Export metrics to agent failed: IOError\\n")   # dropped
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        os.close(saved)
        yield
        return
    forwarder = threading.Thread(target=_forward, args=(read_end, saved, is_noise), name="srdata-stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer in this process is gone: the forwarder reads its end and stops
        forwarder.join(timeout=2.0)
        if not forwarder.is_alive():  # else a child process still holds the pipe: the thread keeps forwarding to saved
            os.close(saved)


def _forward(read_end: int, out: int, is_noise: Callable[[str], bool]) -> None:
    """Copy the pipe to ``out``, dropping whole noise lines (see :func:`filtered_stderr`)."""
    pending = b""
    try:
        while True:
            if pending and not select.select([read_end], [], [], HOLD_SECONDS)[0]:
                _write(out, pending)  # held long enough: not a line being written, pass it on
                pending = b""
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            whole, pending = data[:cut], data[cut:]
            kept = b"".join(line for line in whole.splitlines(keepends=True) if not is_noise(line.decode("utf-8", "replace")))
            if pending and (not pending.startswith(b"[") or b"\r" in pending):
                kept, pending = kept + pending, b""
            _write(out, kept)
    except Exception:  # noqa: BLE001  (a filter must never swallow output: copy the rest as it is)
        _write(out, pending)
        with contextlib.suppress(OSError):
            while chunk := os.read(read_end, 65536):
                _write(out, chunk)
        pending = b""
    _write(out, pending)
    os.close(read_end)


def _write(fd: int, data: bytes) -> None:
    while data:
        try:
            written = os.write(fd, data)
        except InterruptedError:
            continue
        except OSError:
            return  # stderr closed: nothing more can be shown
        data = data[written:]
