"""What a run was trained on, by content: fingerprints of the teacher, the student, the data and the eval file.

``run.json`` records them under ``"inputs"``; a rerun computes them again and refuses to
resume when one differs (:func:`diff_inputs`), naming the input and what to do. Identity is
content, never a path or a modification time: a curriculum re-exported with another
ranking, a teacher whose weights were replaced by others of the same size, or a data file
edited with its mtime kept are other inputs.

* the teacher and the student: :func:`srdata.run.identity.model_identity` (configs,
  tokenizer files and weights of the folder; a hub id by its name);
* cached teacher logits (``--teacher-logits RUN``) instead of a teacher: the teach pass's
  teacher identity, K, the scoring it was made for and the checksum of every shard
  (:func:`srd_distill.teacher_logits.open_teacher_logits`);
* a curriculum: the SHA-256 of each stage file (checked against ``curriculum.json`` when
  the run is planned; ``curriculum.json`` itself is recorded but not compared, since a
  re-export of the same stages writes another ``created_at``);
* the ``--data`` file, the ``--eval-file`` and a schedule file: their SHA-256;
* the encoding read from the source run's manifest (prompt settings decide the tokens).

Example:
    >>> diff_inputs({"data": {"file": "d.jsonl", "sha256": "aa"}}, {"data": {"file": "d.jsonl", "sha256": "bb"}})
    ['data file d.jsonl: its content changed (sha256 aa... -> bb...)']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from srd_distill.schedules import PRESETS
from srdata.run.folder import CURRICULUM_FILE
from srdata.run.identity import model_identity
from srdata.run.io import file_sha256

__all__ = ["input_fingerprints", "diff_inputs"]


def input_fingerprints(
    settings: dict[str, Any], stage_files: Sequence[tuple[int, Path, Optional[str]]], encoding: dict[str, Any],
    teacher_logits: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The content fingerprints of every input of a run, as ``run.json`` records them under ``"inputs"``.

    ``settings``: the run's settings (``TrainSettings.flat()``); ``stage_files``: each
    stage's (index, file, SHA-256 when already computed); ``encoding``: the encoding read from
    the source run; ``teacher_logits``: the cache's fingerprint when the teacher is cached.

    Example:
        >>> inputs = input_fingerprints(s.flat(), [(p.index, p.data_file, p.sha256) for p in plans], {})   # doctest: +SKIP
        >>> sorted(inputs)                                                                                    # doctest: +SKIP
        ['curriculum', 'encoding', 'student', 'teacher']
    """
    inputs: dict[str, Any] = {"student": model_identity(settings["student"])}
    if settings.get("teacher") is not None:
        inputs["teacher"] = model_identity(settings["teacher"])
    if teacher_logits is not None:
        inputs["teacher_logits"] = teacher_logits
    if settings.get("curriculum") is not None:
        folder = Path(settings["curriculum"])
        summary = folder / CURRICULUM_FILE
        inputs["curriculum"] = {
            "folder": str(folder.resolve()),
            "curriculum_json_sha256": file_sha256(summary) if summary.is_file() else None,
            "stage_files": [{"stage": index, "file": file.name, "sha256": digest or file_sha256(file)}
                            for index, file, digest in stage_files],
        }
    else:
        _, file, digest = stage_files[0]
        inputs["data"] = {"file": str(Path(file).resolve()), "sha256": digest or file_sha256(file)}
    if settings.get("eval_file") is not None:
        inputs["eval_file"] = {"file": str(Path(settings["eval_file"]).resolve()), "sha256": file_sha256(settings["eval_file"])}
    schedule = settings.get("schedule", "")
    if schedule not in PRESETS and Path(schedule).is_file():
        inputs["schedule_file"] = {"file": str(Path(schedule).resolve()), "sha256": file_sha256(schedule)}
    inputs["encoding"] = {k: v for k, v in encoding.items() if k != "source"}  # where it was read from is no content
    return inputs


def diff_inputs(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per input whose content differs between a run's record and now (empty: the same inputs).

    Example:
        >>> diff_inputs({"teacher": {"name": "/t", "fingerprint": "1a"}}, {"teacher": {"name": "/t2", "fingerprint": "1a"}})
        []
    """
    lines = []
    for role in ("teacher", "student"):
        before, now = previous.get(role), current.get(role)
        if before is None or now is None:
            continue
        if before.get("fingerprint") and now.get("fingerprint"):
            if before["fingerprint"] != now["fingerprint"]:
                lines.append(f"{role} {now['name']}: its content changed (fingerprint {before['fingerprint']} -> "
                             f"{now['fingerprint']}): its weights, config or tokenizer files differ from the run's")
        elif before.get("name") != now.get("name") or before.get("fingerprint") != now.get("fingerprint"):
            lines.append(f"{role}: {before.get('name')} -> {now.get('name')}")
    lines += _diff_teacher_logits(previous.get("teacher_logits"), current.get("teacher_logits"))
    lines += _diff_stage_files(previous.get("curriculum"), current.get("curriculum"))
    for key, label in (("data", "data file"), ("eval_file", "eval file"), ("schedule_file", "schedule file")):
        before, now = previous.get(key), current.get(key)
        if before != now and (before or {}).get("sha256") != (now or {}).get("sha256"):
            lines.append(f"{label} {(now or before or {}).get('file')}: " + (
                f"its content changed (sha256 {before['sha256'][:12]}... -> {now['sha256'][:12]}...)" if before and now
                else f"{'none' if before is None else 'given'} -> {'none' if now is None else 'given'}"))
    before_enc, now_enc = previous.get("encoding", {}), current.get("encoding", {})
    for key in sorted(set(before_enc) | set(now_enc)):
        if before_enc.get(key) != now_enc.get(key):
            lines.append(f"encoding {key} (from the source run's manifest): {before_enc.get(key)!r} -> {now_enc.get(key)!r}")
    return lines


def _diff_teacher_logits(before: Optional[dict[str, Any]], now: Optional[dict[str, Any]]) -> list[str]:
    """The cached teacher by content (its folder may move): teacher identity, K, the scoring it was made for, shards."""
    if before is None or now is None:
        return [] if before == now else ["teacher logits: " + ("none" if before is None else "given") + " -> " + ("none" if now is None else "given")]
    keys = ("teacher", "top_k", "run_config_hash", "shards_sha256")
    changed = [key for key in keys if before.get(key) != now.get(key)]
    if not changed:
        return []
    return [f"teacher logits {now.get('folder')}: the cache changed ({', '.join(changed)} differ): the teach pass was redone "
            "or its files replaced since the run began"]


def _diff_stage_files(before: Optional[dict[str, Any]], now: Optional[dict[str, Any]]) -> list[str]:
    if before is None or now is None:
        return [] if before == now else ["curriculum: " + ("none" if before is None else "given") + " -> " + ("none" if now is None else "given")]
    old = {f["stage"]: f for f in before.get("stage_files", [])}
    lines = []
    for new in now.get("stage_files", []):
        was = old.get(new["stage"])
        if was is None or was["sha256"] != new["sha256"]:
            lines.append(f"curriculum {now['folder']} stage {new['stage']} ({new['file']}): its content changed "
                         f"(sha256 {(was or {}).get('sha256', 'none')[:12]}... -> {new['sha256'][:12]}...): "
                         "the curriculum was exported again or edited")
    return lines
