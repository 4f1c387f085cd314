"""What the Ray cluster can host, and waiting (visibly, up to ``--wait-for-resources``) until it can.

A replica needs one node with ``--cpus-per-replica`` CPUs and ``--gpus-per-replica`` GPUs.
When no live node has them (an autoscaling cluster that has no GPU node yet, or the only
worker node was lost) the run waits, saying what for and how long is left, and fails with
a clear error when the time is up; finished shards are kept for the next call.

Example:
    >>> nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}, {"Alive": False, "Resources": {"GPU": 8.0}}]
    >>> replicas_nodes_fit(nodes, cpus=1, gpus=1)
    1
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Default --wait-for-resources when joining a cluster (an autoscaler may add a node); a Ray
#: runtime that srdata starts itself never grows, so there it is 0.
CLUSTER_WAIT_SECONDS = 300.0


class ResourcesUnavailableError(ValueError):
    """No node of the Ray cluster could host a replica within ``--wait-for-resources``."""


def replicas_nodes_fit(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many replicas the live nodes could host at once (by their total resources)."""
    total = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources") or {}
        fit = int(have.get("CPU", 0) // cpus) if cpus else 10**6
        if gpus:
            fit = min(fit, int(have.get("GPU", 0) // gpus))
        total += fit
    return total


def need_text(cpus: float, gpus: float) -> str:
    """``1 GPU and 1 CPU``: what one replica needs, in words.

    Example:
        >>> need_text(1, 0)
        '1 CPU'
    """
    cpu = f"{cpus:g} CPU" + ("s" if cpus != 1 else "")
    return f"{gpus:g} GPU{'s' if gpus != 1 else ''} and {cpu}" if gpus else cpu


class ResourceWait:
    """The clock of one wait for a node able to host a replica; ``check`` is called as often as wanted.

    Example:
        >>> wait = ResourceWait(seconds=0, cpus=1, gpus=1, say=print)
        >>> wait.check(fit=2)   # a node fits: nothing to wait for
    """

    def __init__(self, seconds: float, cpus: float, gpus: float, say: Callable[[str], None] | None = None, every: float = 10.0) -> None:
        self.seconds, self.cpus, self.gpus, self.every = seconds, cpus, gpus, every
        self.say = say or log.warning
        self.since: float | None = None
        self.shown = 0.0

    def check(self, fit: int, why: str = "the cluster has none") -> None:
        """Reset when ``fit`` > 0; else start or continue the wait: a message every ``every`` s, an error at the end."""
        now = time.monotonic()
        if fit > 0:
            if self.since is not None:
                self.say(f"a node able to host a replica ({need_text(self.cpus, self.gpus)}) is there: going on")
            self.since = None
            return
        if self.since is None:
            self.since, self.shown = now, 0.0
        left = self.seconds - (now - self.since)
        if left <= 0:
            raise ResourcesUnavailableError(
                f"no node of the Ray cluster can host a replica ({need_text(self.cpus, self.gpus)}; {why}), and none came "
                f"within --wait-for-resources {self.seconds:g} s: add such a node (or let the autoscaler add one and wait "
                "longer with --wait-for-resources SECONDS), or lower --gpus-per-replica / --cpus-per-replica. Shards "
                "already finished are kept: run the same command again to resume"
            )
        if now - self.shown >= self.every or self.shown == 0.0:
            self.shown = now
            self.say(f"waiting for a node with {need_text(self.cpus, self.gpus)} to host a replica ({why}; {left:.0f} s left of "
                     f"--wait-for-resources {self.seconds:g})")


def cluster_fit(ray: Any, cpus: float, gpus: float) -> int:
    """Replicas the cluster's live nodes could host now (``ray.nodes()`` reads the GCS: no dashboard needed)."""
    return replicas_nodes_fit(ray.nodes(), cpus, gpus)


def wait_for_nodes(ray: Any, wait: ResourceWait, poll: float = 1.0) -> int:
    """Block until some live node can host a replica (or ``wait`` runs out); return how many fit."""
    while True:
        fit = cluster_fit(ray, wait.cpus, wait.gpus)
        wait.check(fit)
        if fit > 0:
            return fit
        time.sleep(poll)
