"""A real multi-node Ray cluster on one host, for tests: a head and worker raylets, each from `ray start`.

Several raylets share one host once every port is given (node manager, object manager,
a worker port range of its own, runtime-env agent, metrics, dashboard agent). The cluster
lives in a private temp dir and HOME with ``RAY_AUTH_MODE=disabled``, so token files of
other clusters on the machine do not interfere. It is stopped by killing exactly the
processes it started (found by that temp dir, and their children): ``ray stop`` would stop
every Ray on the machine, other users' included.

Workers may be started "blind" to a folder (an empty tmpfs mounted over it in a private
mount namespace): a node that cannot see a path the driver sees, as on a real cluster.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PORTS_PER_NODE = 40  # 10 for the node's services, 30 for its worker processes


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the processes have exited (a zombie has: nobody here may reap it); return those still running."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


class RayCluster:
    """Start with :meth:`start`; :meth:`add_worker`, :meth:`kill_worker`; always :meth:`stop`."""

    def __init__(self, cpus_per_worker: int = 1, object_store_mb: int = 80) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="srd-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.hidden = self.dir / "hidden"  # what blind workers cannot see
        self.hidden.mkdir()
        (self.dir / "home").mkdir()
        self.cpus, self.store = cpus_per_worker, object_store_mb * 1024**2
        self.env = {**os.environ, "HOME": str(self.dir / "home"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    # a killed node is declared dead in ~3 s instead of ~15 s (Ray's health check of raylets)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.env.pop("RAY_ADDRESS", None)
        self.base = random.randrange(20000, 40000 - 20 * PORTS_PER_NODE, PORTS_PER_NODE)
        self.nodes = 0
        self.workers: dict[str, int] = {}  # node id -> node manager port, for workers alive
        self.blind = False
        self.address = ""

    # ------------------------------------------------------------------ nodes
    def _ports(self) -> list[str]:
        """Every port of the next node, from a block of ports checked free."""
        for _ in range(50):
            b = self.base + self.nodes * PORTS_PER_NODE
            self.nodes += 1
            if all(_free(p) for p in range(b, b + PORTS_PER_NODE)):
                return ["--node-manager-port", str(b), "--object-manager-port", str(b + 1), "--runtime-env-agent-port", str(b + 2),
                        "--metrics-export-port", str(b + 3), "--dashboard-agent-listen-port", str(b + 4),
                        "--dashboard-agent-grpc-port", str(b + 5), "--min-worker-port", str(b + 10), "--max-worker-port", str(b + 39)]
        raise RuntimeError("no free block of ports for a Ray node")

    def _ray_start(self, args: list[str], blind: bool = False) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--temp-dir", str(self.dir / "t"), "--disable-usage-stats",
                   "--object-store-memory", str(self.store), *args]
        if blind:  # an empty tmpfs over `hidden`, seen by this node's processes only
            inner = f"mount -t tmpfs tmpfs {self.hidden} && exec " + subprocess.list2cmdline(command)
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
        return subprocess.run(command, env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=120)

    def start(self, workers: int = 2) -> "RayCluster":
        head_port = self._ports()
        port = int(head_port[1]) + 6
        dash = int(head_port[1]) + 7
        client = int(head_port[1]) + 8
        done = self._ray_start(["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false",
                                "--dashboard-port", str(dash), "--ray-client-server-port", str(client), *head_port])
        if done.returncode != 0:
            raise RuntimeError(f"ray start --head failed: {done.stderr[-2000:]}")
        self.address = f"127.0.0.1:{port}"
        self.blind = shutil.which("unshare") is not None and os.geteuid() == 0
        for _ in range(workers):
            self.add_worker()
        return self

    def add_worker(self) -> str:
        """Start one more worker raylet (blind to ``hidden`` where possible); return its node id."""
        before = set(self._node_ids())
        args = ["--address", self.address, "--num-cpus", str(self.cpus), *self._ports()]
        done = self._ray_start(args, blind=self.blind)
        if done.returncode != 0 and self.blind:  # no mount namespace here: a worker that sees everything
            self.blind = False
            done = self._ray_start(args)
        if done.returncode != 0:
            raise RuntimeError(f"ray start (worker) failed: {done.stderr[-2000:]}")
        for _ in range(100):
            new = set(self._node_ids()) - before
            if new:
                node = new.pop()
                self.workers[node] = 0
                return node
            time.sleep(0.2)
        raise RuntimeError("the worker raylet did not come up")

    def kill_workers(self, *node_ids: str) -> int:
        """Kill worker nodes for real, all at once: SIGKILL to each raylet and every process under it (agents, workers)."""
        victims = []
        for node_id in node_ids:
            raylet = next(p for p in self._processes() if f"--node_id={node_id}" in (p.info["cmdline"] or []))
            victims += [raylet, *raylet.children(recursive=True)]
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for node_id in node_ids:
            self.workers.pop(node_id, None)
        return len(victims)

    def _node_ids(self) -> list[str]:
        """Node ids of this cluster's live raylets (from their command lines)."""
        ids = []
        for proc in self._processes():
            args = proc.info["cmdline"] or []
            if args and args[0].endswith("raylet"):
                ids += [a.split("=", 1)[1] for a in args if a.startswith("--node_id=")]
        return ids

    # ------------------------------------------------------------------ stop
    def _processes(self) -> list[psutil.Process]:
        """Processes of this cluster: those naming its temp dir, never this test's own process or parents."""
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        marker, found = str(self.dir), []
        for proc in psutil.process_iter(["cmdline"]):
            args = proc.info["cmdline"] or []
            if proc.pid not in mine and any(a.startswith(marker) or f"={marker}" in a for a in args[1:]):
                found.append(proc)
        return found

    def stop(self) -> None:
        """Kill exactly this cluster's processes (and their children), then remove its folder."""
        procs: dict[int, psutil.Process] = {}
        for root in self._processes():
            try:
                for proc in (root, *root.children(recursive=True)):
                    procs[proc.pid] = proc
            except psutil.NoSuchProcess:
                pass
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        for proc in _wait_gone(list(procs.values()), timeout=3):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
