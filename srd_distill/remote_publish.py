"""Publishing a staged ``srd-distill`` run folder to its remote ``--output`` (see :mod:`srd_distill.remote`).

Called by :mod:`srd_distill.run_folder` whenever it finishes a stage or writes ``run.json``;
a folder that is not a staging folder of a remote location publishes nothing.

Example:
    >>> publish_run_files(Path("runs/kd"), ["run.json"])   # a local run: nothing to do
"""

from __future__ import annotations

from pathlib import Path

from srd_distill.checkpoints import CHECKSUM_FILE  # written last into a sealed checkpoint
from srdata.run.storage import remote_of, upload


def publish_run_files(run_dir: Path, names: list[str]) -> None:
    """Upload these files of a staged run (``metrics.jsonl``, then ``run.json``: the commit) to its remote folder, if it has one."""
    remote = remote_of(run_dir)
    if remote is None:
        return
    for name in names:
        if (run_dir / name).is_file():
            upload(run_dir / name, remote / name)


def publish_stage(run_dir: Path, folder: Path) -> None:
    """Upload a sealed stage folder of a staged run, its checksum file last (a reader trusts only a folder that has it)."""
    remote = remote_of(run_dir)
    if remote is None:
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == CHECKSUM_FILE):
        upload(path, remote / folder.name / path.relative_to(folder).as_posix())
