"""Ray's metrics-exporter errors are kept out of srdata's output (issue 24); srdata's lines and real errors pass.

The noise lines are Ray's own messages as its C++ core prints them (the quoted text is in
srdata/engines/noise.py with the source file of each); the C++ core writes them to file
descriptor 2 directly, so the test writes them there with ``os.write``, from a real process.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from srdata.engines.noise import KnownRayNoise, is_ray_noise

from .conftest import REPO_ROOT

# As printed: "[time level pid tid] file:line: message" (the driver's own core worker, no prefix), or
# forwarded by Ray's log monitor with the process's name in front.
RAY_NOISE_LINES = [
    "[2025-11-04 22:53:14,867 E 766 798] core_worker_process.cc:825: Failed to establish connection to the metrics exporter "
    "agent. Metrics will not be exported. Exporter agent status: RpcError: Running out of retries to initialize the metrics "
    "agent. rpc_code: 14",
    "(raylet) [2026-03-03 13:07:48,113 E 522139 522139] main.cc:1032: Failed to establish connection to the metrics exporter "
    "agent. Metrics will not be exported. Exporter agent status: RpcError: Running out of retries to initialize the metrics "
    "agent. rpc_code: 14",
    "(pid=gcs_server) [2026-03-03 13:07:44,212 E 521611 521611] gcs_server.cc:303: Failed to establish connection to the "
    "event+metrics exporter agent. Events and metrics will not be exported. Exporter agent status: RpcError: Running out of "
    "retries to initialize the metrics agent. rpc_code: 14",
    "[2026-01-10 08:00:00,000 W 4242 4250] open_telemetry_metric_recorder.cc:61: Failed to export metrics to the metrics "
    "agent. Result: 1",
    "[2023-01-30 10:00:00,000 W 4242 4250] metric_exporter.cc:206: Export metrics to agent failed: IOError: 14: failed to "
    "connect to all addresses. This won't affect Ray, but you can lose metrics from the cluster.",
]
KEPT_LINES = [
    "teacher dtype: float32 (auto: the scored run's dtype)",  # srdata's own
    "scored 6 rows; next: srdata export s3://bucket/runs/a",
    "warning: column 'text' is both the prompt and the response",
    "[2026-01-10 08:00:00,000 E 4242 4242] core_worker_process.cc:512: Failed to get the system config from raylet because "
    "it is dead. Worker will terminate. Status: GrpcUnavailable",  # Ray's real errors
    "[2026-01-10 08:00:00,000 W 4242 4242] rpc_client.h:153: Failed to connect to GCS at address 10.0.0.1:6379 within 5 seconds.",
    "A worker died or was killed while executing a task by an unexpected system error.",
    "metrics: the metrics agent is absent",  # words alone are not Ray's message
]


def test_ray_metrics_exporter_lines_are_noise_and_others_are_not():
    def passes(message: str) -> bool:
        return KnownRayNoise().filter(logging.LogRecord("ray", logging.ERROR, "", 0, message, None, None))

    assert [passes(line) for line in RAY_NOISE_LINES] == [False] * len(RAY_NOISE_LINES)
    assert [passes(line) for line in KEPT_LINES] == [True] * len(KEPT_LINES)
    assert not passes("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert all(is_ray_noise(line.upper()) for line in RAY_NOISE_LINES)


def test_the_lines_ray_writes_to_stderr_are_dropped_and_the_rest_pass_in_order():
    """A real process writes to descriptor 2 as Ray's C++ does (os.write: one write per line, or split), and through
    Python's sys.stderr, with a progress bar's carriage returns; only Ray's metrics lines are gone."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from srdata.engines.noise import filtered_stderr
        noise, kept = {RAY_NOISE_LINES!r}, {KEPT_LINES!r}
        with filtered_stderr():
            for a, b in zip(noise, kept):
                os.write(2, (a + "\\n").encode())
                print(b, file=sys.stderr, flush=True)
            half = len(noise[0]) // 2
            os.write(2, noise[0][:half].encode()); time.sleep(0.05); os.write(2, (noise[0][half:] + "\\n").encode())
            sys.stderr.write("\\r 50%|#####     |"); sys.stderr.flush()
            sys.stderr.write("\\r100%|##########|\\n"); sys.stderr.flush()
            for line in kept[len(noise):]:
                os.write(2, (line + "\\n").encode())
            os.write(2, b"[no end of line")
        print("after", file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, cwd=REPO_ROOT)  # bytes: \r kept
    assert done.returncode == 0, done.stderr.decode()
    expected = "\n".join(KEPT_LINES[: len(RAY_NOISE_LINES)]) + "\n\r 50%|#####     |\r100%|##########|\n"
    expected += "\n".join(KEPT_LINES[len(RAY_NOISE_LINES):]) + "\n[no end of lineafter\n"
    assert done.stderr.decode() == expected
