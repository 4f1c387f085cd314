"""One Ray replica: an actor that checks the node it runs on, then holds one student and scores whole shards.

What a replica checks before it loads anything (so a bad node fails in a second, not after
the model has loaded): the model folder is there (the driver sends its absolute path), and
``--device`` names a device this node has. It then records where the work really runs:
the node, the device and backend that ``auto`` resolved to *here*, the model's content
fingerprint as this node sees it, and the versions of the packages that compute the values.
The driver compares these records (:func:`replica_mismatch`) and keeps them in the manifest.

Example:
    >>> record = {"replica": 0, "node_ip": "10.0.0.2", "backend": "hf", "device": "cpu", "versions": {"torch": "2.5"}}
    >>> replica_mismatch({**record, "replica": 1, "backend": "vllm"}, record, None)[:44]
    'replica 1 on node 10.0.0.2 (host ?) uses the'
"""

from __future__ import annotations

import os
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

#: Packages whose versions decide the values a replica computes, with its backend's own (``Backend.packages``).
VALUE_PACKAGES = ("srdata", "torch", "transformers", "tokenizers")


def package_versions(backend: str) -> dict[str, str]:
    """Installed versions of the packages that compute the values here.

    Example:
        >>> "srdata" in package_versions("hf")
        True
    """
    from srdata.backends import backend_packages

    versions = {}
    for name in dict.fromkeys((*VALUE_PACKAGES, *backend_packages(backend))):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def node_here() -> dict[str, Any]:
    """Where this process runs: the Ray node's IP and id (when inside Ray), the host name and pid."""
    where: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            where["node_id"] = context.get_node_id()
            where["node_ip"] = ray.util.get_node_ip_address()
            where["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001  (a record of where, never a reason to fail)
        pass
    return where


def node_name(record: dict[str, Any]) -> str:
    """``10.0.0.2 (host h, node 1a2b3c4d)``: how messages name a node."""
    node = record.get("node_id") or ""
    return f"{record.get('node_ip', '?')} (host {record.get('hostname', '?')}" + (f", node {node[:8]})" if node else ")")


def check_here(config: Any, gpus_per_replica: float) -> str | None:
    """What makes this node unable to run the replica, in words; ``None`` when it can.

    Example:
        >>> from srdata.config import build_config
        >>> check_here(build_config(dict(dataset="d", model="/nonexistent/m", output="o")), 0)[:38]
        'the model folder /nonexistent/m is not'
    """
    model = config.model.path
    if os.path.isabs(model) and not os.path.isdir(model):
        return (
            f"the model folder {model} is not visible on this node: copy it to the same path on every node "
            "(or a shared file system mounted there), or pass a hub id the nodes can download"
        )
    from srdata.backends import check_device

    try:
        check_device(config.model.device)
    except ValueError as err:
        hint = ""
        if gpus_per_replica == 0:
            hint = " (with --gpus-per-replica 0 Ray gives the replica no GPU: pass --gpus-per-replica 1)"
        return f"{err}{hint}"
    return None


def describe_here(config: Any) -> dict[str, Any]:
    """Device, backend, dtype, model fingerprint and package versions as resolved on this node."""
    from srdata.backends import decode_attention_kernel, resolve_run_dtype, select_backend
    from srdata.run.identity import model_identity

    device = config.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = select_backend(config.model.backend)
    # --dtype auto depends on the node's hardware (bfloat16 on GPUs and bf16-capable CPUs): resolved and compared here.
    dtype, dtype_reason = resolve_run_dtype(backend, device, config.model.dtype)
    return {"device": device, "backend": backend, "dtype": dtype, "dtype_reason": dtype_reason,
            "decode_attention": decode_attention_kernel(backend, device, dtype), "model": model_identity(config.model.path), "versions": package_versions(backend)}


def replica_mismatch(record: dict[str, Any], reference: dict[str, Any], driver_model: dict[str, Any] | None) -> str | None:
    """Why ``record`` must not score shards next to ``reference`` (the first replica), or ``None``.

    The model's fingerprint is compared with the driver's (whose fingerprint the run folder
    records); backend, device type and package versions with the first replica's.
    """
    who = f"replica {record.get('replica')} on node {node_name(record)}"
    first = f"replica {reference.get('replica')} on node {node_name(reference)}"
    seen, expected = (record.get("model") or {}).get("fingerprint"), (driver_model or {}).get("fingerprint")
    if expected and seen != expected:
        return (f"{who} sees another model at {record['model'].get('name')} (fingerprint {seen}) than the driver "
                f"({expected}): put the same model folder on every node")
    if record.get("backend") != reference.get("backend"):
        return (f"{who} uses the {record.get('backend')} backend, {first} the {reference.get('backend')} backend: "
                "pass --backend hf or --backend vllm, or make the nodes alike")
    if str(record.get("device", "")).split(":")[0] != str(reference.get("device", "")).split(":")[0]:
        return (f"{who} runs on {record.get('device')}, {first} on {reference.get('device')}: the values would differ; "
                "pass --device cuda (and --gpus-per-replica) or --device cpu")
    if record.get("dtype") != reference.get("dtype"):
        return (f"{who} computes in {record.get('dtype')} ({record.get('dtype_reason')}), {first} in "
                f"{reference.get('dtype')} ({reference.get('dtype_reason')}): the values would differ; pass --dtype float32 "
                "or --dtype bfloat16")
    ours, theirs = record.get("versions") or {}, reference.get("versions") or {}
    differ = [f"{name} {ours.get(name)} vs {theirs.get(name)}" for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    if differ:
        return (f"{who} and {first} have other package versions ({'; '.join(differ)}): install the same versions on "
                "every node (one container image, or a Ray runtime_env)")
    return None


#: ``Manifest.backend`` on Ray until a replica reports: the driver does not guess what the nodes resolve.
BACKEND_ON_REPLICAS = "per replica (none reported yet)"


def record_differences(record: dict[str, Any], earlier: dict[str, Any]) -> list[str]:
    """What differs between two records in what decides the values; only fields both records hold.

    Backend, device kind, dtype, model fingerprint and package versions; never node names or pids.

    Example:
        >>> record_differences({"backend": "hf", "dtype": "float32", "pid": 1}, {"backend": "vllm", "dtype": "bfloat16", "pid": 2})
        ['backend hf vs vllm', 'dtype float32 vs bfloat16']
    """
    differ = []
    for key in ("backend", "device", "dtype"):
        ours, theirs = record.get(key), earlier.get(key)
        if key == "device":
            ours, theirs = (str(v).split(":")[0] if v else v for v in (ours, theirs))
        if ours and theirs and ours != theirs:
            differ.append(f"{key} {ours} vs {theirs}")
    ours, theirs = (record.get("model") or {}).get("fingerprint"), (earlier.get("model") or {}).get("fingerprint")
    if ours and theirs and ours != theirs:
        differ.append(f"model fingerprint {ours} vs {theirs}")
    ours, theirs = record.get("versions") or {}, earlier.get("versions") or {}
    differ += [f"{name} {ours[name]} vs {theirs[name]}" for name in sorted(set(ours) & set(theirs)) if ours[name] != theirs[name]]
    return differ


def who(record: dict[str, Any]) -> str:
    """How a message names a record's replica: ``replica 0 on node 10.0.0.2 (...)`` or ``the local engine``."""
    if record.get("replica") is None:
        return "the local engine"
    return f"replica {record['replica']} on node {node_name(record)}"


def earlier_records(previous: Any) -> list[dict[str, Any]]:
    """What scored a run's finished shards, from its manifest (``None``: no earlier run): the Ray replicas'
    records, or for a run scored by the local engine its backend and resolved dtype (``precision``).

    Example:
        >>> from srdata.run.folder import Manifest
        >>> earlier_records(Manifest.model_validate({"backend": "vllm", "precision": {"dtype": "bfloat16"}}))
        [{'replica': None, 'backend': 'vllm', 'dtype': 'bfloat16'}]
    """
    if previous is None:
        return []
    replicas = (previous.model_extra or {}).get("replicas")
    if replicas:
        return [dict(r) for r in replicas]
    if (previous.config.model_dump().get("engine") or {}).get("engine") == "ray":  # no replica reported: nothing known, no guess
        return []
    record: dict[str, Any] = {"replica": None}
    if previous.backend and previous.backend != BACKEND_ON_REPLICAS:
        record["backend"] = previous.backend
    dtype = ((previous.model_extra or {}).get("precision") or {}).get("dtype")
    if dtype and dtype != "auto":
        record["dtype"] = dtype
    return [record] if len(record) > 1 else []


def resume_mismatch(record: dict[str, Any], earlier: list[dict[str, Any]]) -> str | None:
    """Why ``record`` must not score next to the shards ``earlier`` records scored (an earlier call), or ``None``.

    Example:
        >>> resume_mismatch({"replica": None, "backend": "hf", "dtype": "float32"}, [{"replica": None, "backend": "hf", "dtype": "bfloat16"}])[:60]
        'refusing to resume: the local engine (hf, float32) would sco'
    """
    for before in earlier:
        differ = record_differences(record, before)
        if differ:
            return (
                f"refusing to resume: {who(record)} ({_summary(record)}) would score next to the shards that {who(before)} "
                f"({_summary(before)}) scored in an earlier call, and they differ ({'; '.join(differ)}): the values would mix. "
                "Resume with the same hardware, --backend and --dtype as that call, or pass --overwrite to score the whole run again"
            )
    return None


def _summary(record: dict[str, Any]) -> str:
    return ", ".join(str(record[k]) for k in ("backend", "device", "dtype") if record.get(k))


def record_replica(manifest: Any, record: dict[str, Any], write: Any) -> None:
    """Add a replica's record to ``manifest.replicas`` (earlier calls' records kept); the first one also sets
    ``backend`` and the ``precision`` of ``--dtype auto``, which the driver left to the replicas; then ``write(manifest)``.

    Example:
        >>> from srdata.run.folder import Manifest
        >>> m = Manifest(backend=BACKEND_ON_REPLICAS)
        >>> record_replica(m, {"replica": 0, "backend": "vllm", "dtype": "bfloat16"}, write=lambda manifest: None)
        >>> m.backend, m.replicas[0]["dtype"]
        ('vllm', 'bfloat16')
    """
    if manifest.backend in (None, BACKEND_ON_REPLICAS):
        manifest.backend = record["backend"]  # resolved where the work runs, not on the driver
    precision = dict(getattr(manifest, "precision", None) or {})
    if record.get("dtype") and precision.get("dtype") in (None, "auto"):  # --dtype auto, resolved on the replica's node
        precision.update(dtype=record["dtype"], reason=f"{record.get('dtype_reason')}, on {who(record)}")
        manifest.precision = precision
    manifest.replicas = [*(getattr(manifest, "replicas", None) or []), record]
    write(manifest)


class ShardScorer:
    """The Ray actor: checks this node, loads one student, scores whole shards.

    ``config`` is the run's resolved config as a dict (template and columns in it).
    ``score`` takes a shard's index, srd_id range and its input rows (Arrow IPC bytes) and
    returns ``(index, scored frame as Arrow IPC bytes, seconds on the actor)``.
    """

    def __init__(self, config: dict[str, Any], open_student: Any, gpus_per_replica: float = 0) -> None:
        from srdata.config import ScoreConfig

        started = time.perf_counter()
        parsed = ScoreConfig.model_validate(config)
        self.record: dict[str, Any] = node_here()
        self.problem = check_here(parsed, gpus_per_replica)
        self.student = None
        if self.problem is None:  # check first: a node that cannot run the replica fails before any loading
            self.record.update(describe_here(parsed))
            self.student = open_student(parsed, None)  # the resolved config (template, columns); its own tokenizer
        self.record["load_seconds"] = round(time.perf_counter() - started, 3)

    def info(self) -> dict[str, Any]:
        """This replica's record, with ``problem`` set when the node cannot run it."""
        return {**self.record, "problem": self.problem}

    def score(self, index: int, start: int, stop: int, rows: bytes) -> tuple[int, bytes, float]:
        import io

        import pyarrow as pa

        from srdata.run.folder import Shard

        t0 = time.perf_counter()
        frame = self.student(pa.ipc.open_stream(rows).read_all().to_pydict(), Shard(index, start, stop))
        buffer = io.BytesIO()
        frame.write_ipc_stream(buffer)
        return index, buffer.getvalue(), time.perf_counter() - t0


def absolute_model(model: str) -> str:
    """The model as the replicas get it: an existing folder as its absolute path (a relative path
    would be resolved against each node's own working folder), a hub id unchanged.

    Example:
        >>> absolute_model("org/some-model-id-that-is-not-a-folder")
        'org/some-model-id-that-is-not-a-folder'
    """
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model
