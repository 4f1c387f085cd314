"""manifest.json is read back through one typed model by every command."""

from __future__ import annotations

import json

import pytest

from srdata.run.folder import Manifest, RunDirError, read_manifest, write_manifest


def test_unknown_settings_and_keys_are_kept_or_left_out_not_refused(tmp_path):
    recorded = {
        "status": "complete",
        "config": {"generation": {"max_new_tokens": 7, "a_future_setting": 1}, "a_future_section": {}},
        "a_future_key": [1, 2],
        "shards": [{"index": 0, "file": "shards/shard-00000.parquet", "start": 0, "stop": 3, "done": True}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(recorded))
    manifest = read_manifest(tmp_path)
    assert manifest.status == "complete" and manifest.config.generation.max_new_tokens == 7
    assert manifest.shards[0].stop == 3 and manifest.shards[0].batch_size is None
    write_manifest(tmp_path, manifest)
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written["a_future_key"] == [1, 2]  # kept on rewrite (srdata rank rewrites the manifest)
    assert "batch_size" not in written["shards"][0]  # never set: not written as null


def test_a_manifest_that_cannot_be_read_is_named(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "half-done"}))
    with pytest.raises(RunDirError, match=r"manifest.json is not an srdata manifest \(status"):
        read_manifest(tmp_path)


def test_srd_distill_refuses_a_source_manifest_it_cannot_read(tmp_path):
    from srd_distill.data import find_encoding_settings
    from srd_distill.errors import TrainingSetupError

    (tmp_path / "manifest.json").write_text(json.dumps({"status": "half-done"}))
    (tmp_path / "annotated.parquet").write_bytes(b"")
    with pytest.raises(TrainingSetupError, match="encoding settings of the source run"):
        find_encoding_settings(tmp_path / "annotated.parquet")


def test_to_json_leaves_out_what_was_never_set():
    manifest = Manifest(status="running")
    assert manifest.to_json() == {"status": "running"}
    manifest.counts = {"rows_scored": 3}
    assert manifest.to_json()["counts"] == {"rows_scored": 3}
