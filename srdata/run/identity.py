"""Content identity: a dataset or a model is the same input only when its bytes are the same.

Paths and modification times are not identity: a file edited with its mtime kept (``cp -p``,
``rsync -t``, ``tar x``) is another input, and replaced weights are another model. Both
``srdata score`` and ``srd-distill train`` record these fingerprints and refuse to resume
or reuse work when one changed.

Weights are loaded from safetensors only: a pickle checkpoint (``pytorch_model.bin``) can run
code when it is read, so :func:`require_safetensors` refuses such a model folder up front.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from srdata.run.io import file_sha256, is_tool_file

#: Files of a model folder that decide its outputs: configs, tokenizer files and weights.
_MODEL_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".tiktoken", ".gguf", ".jinja"}


def files_digest(files: Iterable[str | Path], root: str | Path | None = None) -> str:
    """One SHA-256 over several files' names (relative to ``root``) and bytes, in sorted order.

    Example:
        >>> files_digest([]) == hashlib.sha256().hexdigest()
        True
    """
    digest = hashlib.sha256()
    for file in sorted(Path(f) for f in files):
        name = file.relative_to(root) if root is not None else file.name
        digest.update(f"{name}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()


def model_identity(model: str | Path) -> dict[str, Any]:
    """A model folder's path and a fingerprint of its content (configs, tokenizer, weights).

    A hub id (no such folder) is identified by its name only.

    Example:
        >>> model_identity("gpt2")
        {'name': 'gpt2'}
    """
    path = Path(model)
    if not path.is_dir():
        return {"name": str(model)}
    files = [f for f in path.iterdir() if f.is_file() and f.suffix in _MODEL_SUFFIXES]
    return {"name": str(path.resolve()), "fingerprint": files_digest(files, path)[:16]}


# ---------------------------------------------------------------------------- datasets
def local_dataset_files(dataset: str) -> list[Path] | None:
    """The local files a dataset argument reads, sorted; ``None`` for a hub id (nothing local).

    ``dataset`` is what ``srdata score`` takes: a data file, a glob or comma-separated list of
    them, a ``save_to_disk`` folder or a folder of data files (every file in it but hidden ones
    and srdata's own lock and temp files).

    Example:
        >>> local_dataset_files("org/name") is None
        True
    """
    path = Path(dataset)
    if path.is_dir():
        return _folder_files(path)
    parts = [part.strip() for part in dataset.split(",")]
    matches = {Path(m) for part in parts for m in glob.glob(part)}
    if not matches and not any(Path(part).exists() for part in parts):
        return None
    return sorted(m for m in matches if m.is_file())


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))  # datasets skips hidden folders too
        files += [Path(root, n) for n in names if not n.startswith((".", "__")) and not is_tool_file(n)]
    return sorted(files)


def dataset_identity(files: list[Path], root: str | Path | None = None) -> dict[str, Any]:
    """A fingerprint of a dataset's content: one SHA-256 over its files' names and bytes.

    ``root`` (a dataset folder) makes names relative to it; files given one by one are
    named by their base name, so ``data.jsonl`` and ``/work/data.jsonl`` are one dataset.

    Example:
        >>> dataset_identity([])["files"]
        0
    """
    return {"content": files_digest(files, root), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def file_states(files: Iterable[Path]) -> dict[str, tuple[int, int, int, int]]:
    """Size, mtime, ctime and inode of each file: compared after a read to catch a file changed meanwhile.

    The ctime cannot be set back by ``touch`` or ``cp -p``, so an edit between hashing and
    reading shows here even when the mtime was kept.

    Example:
        >>> file_states([]) == {}
        True
    """
    states = {}
    for f in files:
        st = os.stat(f)
        states[str(f)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return states


# ---------------------------------------------------------------------------- weights
#: Weight files that are pickles (torch.load): reading one may run code hidden in it.
PICKLE_WEIGHTS = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


class UnsafeWeightsError(ValueError):
    """A model folder holds weights only in a pickle format; the message says how to convert them."""


def require_safetensors(model: str | Path) -> None:
    """Refuse a local model folder whose weights exist only as pickles (``pytorch_model.bin``).

    srdata and srd-distill load safetensors only: unpickling a checkpoint can execute code
    hidden in it. A hub id or a folder without any weights is left to the loader.

    Example:
        >>> require_safetensors("gpt2")   # a hub id: nothing local to check
    """
    path = Path(model)
    if not path.is_dir():
        return
    names = [f.name for f in path.iterdir() if f.is_file()]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if Path(n).suffix in PICKLE_WEIGHTS or n.endswith(".bin.index.json"))
    if pickles:
        raise UnsafeWeightsError(
            f"model folder {path} holds weights only as pickle files ({', '.join(pickles[:3])}); srdata loads only "
            "safetensors, because reading a pickle can run code hidden in it. If you trust the file, convert it once, "
            "in a trusted environment: AutoModelForCausalLM.from_pretrained(path, use_safetensors=False)"
            ".save_pretrained(out, safe_serialization=True) and AutoTokenizer.from_pretrained(path).save_pretrained(out) "
            "(safe_serialization=True is the default, and the only choice from transformers 5 on), then pass the folder out"
        )
