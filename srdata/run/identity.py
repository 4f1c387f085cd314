"""Content identity: a dataset or a model is the same input only when its bytes are the same.

Paths and modification times are not identity: a file edited with its mtime kept (``cp -p``,
``rsync -t``, ``tar x``) is another input, and replaced weights are another model. Both
``srdata score`` and ``srd-distill train`` record these fingerprints and refuse to resume
or reuse work when one changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

from srdata.run.io import file_sha256

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
