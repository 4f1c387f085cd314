"""``srd-distill train`` with object storage: inputs read through verified local copies, ``--output`` published stage by stage.

* ``--curriculum s3://...``: ``curriculum.json`` and every stage file it lists, each checked
  against its recorded SHA-256 (:func:`srdata.curriculum.remote_read.local_curriculum`).
* ``--data s3://...``: the file, copied whole (its SHA-256 is recorded in ``run.json`` as for
  a local file); ``--teacher-logits s3://RUN``: the run's ``manifest.json`` and ``teacher/``,
  which :mod:`srd_distill.teacher_logits` checks shard by shard as it does locally.
* ``--output s3://...``: the run works in a local staging folder. A finished stage's
  checkpoint is uploaded when it is sealed, its checksum file (``srd_checksums.json``) last;
  ``metrics.jsonl`` and then ``run.json`` after every stage and at the end (``run.json`` is the
  commit: :mod:`srd_distill.run_folder` publishes through :mod:`srd_distill.remote_publish`). A rerun
  downloads ``run.json``, ``metrics.jsonl`` and every stage folder whose checksum file is there,
  and verifies them as it verifies local ones. Step checkpoints stay in the staging folder: a
  rerun elsewhere resumes after the last finished stage. One writer: a lock object.
* ``--eval-file``, ``--teacher``, ``--student`` and a schedule file take local paths only.

Example:
    >>> uses_remote_storage(TrainSettings(teacher="t", student="s", output="s3://b/kd", data="d.jsonl"))   # doctest: +SKIP
    True
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from srdata.run.folder import MANIFEST_FILE
from srdata.run.io import is_tool_file
from srdata.run.remote_lock import RemoteLock
from srdata.run.storage import (Location, check_bucket, download, is_remote, list_names, local_path, parse_location, remember_published,
                                staging_folder)

from srd_distill.remote_publish import CHECKSUM_FILE
REMOTE_INPUTS = {"curriculum": "--curriculum", "data": "--data", "teacher_logits": "--teacher-logits", "output": "--output"}
LOCAL_ONLY = {"eval_file": "--eval-file", "teacher": "--teacher", "student": "--student"}


def uses_remote_storage(settings: Any) -> bool:
    """Whether any path setting is a URI (``s3://``, ``file://``, or one srd-distill must refuse by name)."""
    from srdata.run.storage import MANGLED, scheme_of

    values = [getattr(settings, key, None) for key in (*REMOTE_INPUTS, *LOCAL_ONLY)]
    # "s3:/b/x" (a URI that lost a slash) too: it is refused by name there, never made a local folder
    return any(isinstance(v, str) and (scheme_of(v) is not None or MANGLED.match(v) is not None) for v in values)


def train_with_storage(train: Callable[..., Any], settings: Any, **kwargs: Any) -> Any:
    """Run ``train`` on local copies of the remote inputs, its output staged and published (see the module docstring)."""
    from srdata.curriculum.remote_read import local_curriculum

    updates: dict[str, Any] = {}
    for key, flag in LOCAL_ONLY.items():
        value = getattr(settings, key, None)
        if isinstance(value, str) and not _is_hub_id(value):
            updates[key] = str(local_path(value, flag))
    if settings.curriculum is not None:
        updates["curriculum"] = str(local_curriculum(settings.curriculum, "--curriculum"))
    if settings.data is not None:
        updates["data"] = str(_local_file(settings.data, "--data"))
    if settings.teacher_logits is not None:
        updates["teacher_logits"] = str(_local_teacher_logits(settings.teacher_logits))
    output = parse_location(settings.output, "--output")
    if not output.is_remote:
        return train(settings.replace(**{**updates, "output": str(output.local)}), **kwargs)
    check_bucket(output)
    _check_remote_output(output)
    with RemoteLock(output, "srd-distill train", say=kwargs.get("echo") or (lambda message: None)):
        staged = _mirror_output(output)
        return train(settings.replace(**{**updates, "output": str(staged)}), **kwargs)


def _is_hub_id(value: str) -> bool:
    return not is_remote(value) and not value.startswith("file:") and not Path(value).exists() and ":" not in value


def _local_file(value: str, flag: str) -> Path:
    location = parse_location(value, flag)
    if not location.is_remote:
        return location.local
    local = staging_folder(location, "input") / location.name
    if not download(location, local):
        from srd_distill.errors import TrainingSetupError

        raise TrainingSetupError(f"data file {location} does not exist")
    remember_published(local, location)
    return local


def _local_teacher_logits(value: str) -> Path:
    location = parse_location(value, "--teacher-logits")
    if not location.is_remote:
        return location.local
    local = staging_folder(location, "teacher-logits")
    shutil.rmtree(local, ignore_errors=True)
    download(location / MANIFEST_FILE, local / MANIFEST_FILE)
    for name in list_names(location / "teacher"):
        download(location / "teacher" / name, local / "teacher" / name)
    remember_published(local, location)
    return local


def _check_remote_output(output: Location) -> None:
    from srd_distill.errors import RunFolderError
    from srd_distill.run_folder import OUR_NAME_PATTERN, RUN_FILE

    names = [n for n in list_names(output) if not is_tool_file(n.rsplit("/", 1)[-1])]
    if RUN_FILE in names:
        return
    foreign = sorted({n.split("/", 1)[0] for n in names if not OUR_NAME_PATTERN.fullmatch(n.split("/", 1)[0])})
    if foreign:
        raise RunFolderError(f"--output {output} is not empty and holds no srd-distill run ({', '.join(foreign[:5])}); nothing "
                             "was touched. Choose a new or empty folder")


def _mirror_output(output: Location) -> Path:
    """The staging folder holding the remote run's record and its sealed stage folders (verified later, as local ones)."""
    from srd_distill.run_folder import METRICS_FILE, RUN_FILE, STAGE_FOLDER_PATTERN

    staged = staging_folder(output, "distill")
    shutil.rmtree(staged, ignore_errors=True)  # srdata's own staging copy: the remote folder is the truth
    staged.mkdir(parents=True)
    names = list_names(output)
    for name in (RUN_FILE, METRICS_FILE):
        if name in names:
            download(output / name, staged / name)
    sealed = {n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith("/" + CHECKSUM_FILE)
              and STAGE_FOLDER_PATTERN.fullmatch(n.split("/", 1)[0])}
    for name in names:
        if name.split("/", 1)[0] in sealed:
            download(output / name, staged / name)
    remember_published(staged, output, publish=True)
    return staged
