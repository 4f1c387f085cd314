"""Issue 26 item 7: attributes renamed for the code (``config.model.path``, ``config.engine.name``) while the
settings keep their names: the flags, config-file keys, manifest.json and settings hashes are what they were."""

from __future__ import annotations

import json
import warnings

import pytest

from srdata.config import EngineConfig, ModelConfig, build_config, read_config_file, result_settings, settings_hash
from srdata.run.folder import RecordedConfig

SETTINGS = dict(dataset="d.jsonl", model="m", output="o", engine="ray", num_replicas=2, max_new_tokens=8)


def test_code_reads_the_new_names_and_files_keep_the_old_keys():
    config = build_config(SETTINGS)
    assert (config.model.path, config.engine.name) == ("m", "ray")
    dumped = config.model_dump()
    assert dumped["model"]["model"] == "m" and dumped["engine"]["engine"] == "ray"
    assert "path" not in dumped["model"] and "name" not in dumped["engine"]
    assert json.loads(config.model_dump_json())["model"]["model"] == "m"
    # The same hash as before the rename (computed by the code of commit 3a8a05b): recorded runs still resume.
    assert settings_hash(result_settings(config)) == "25b9568db4c033fb"


def test_flags_and_config_files_keep_their_names(tmp_path):
    from srdata.cli import main

    options = {p.name: p.opts for p in main.commands["score"].params}
    assert options["model"][0] == "--model" and options["engine"] == ["--engine"]
    assert "path" not in options and "name" not in options
    (tmp_path / "score.yaml").write_text("model: ./student\nengine:\n  engine: local\n", encoding="utf-8")
    assert read_config_file(tmp_path / "score.yaml") == {"model": {"model": "./student"}, "engine": {"engine": "local"}}
    with pytest.raises(ValueError, match="unknown setting 'path'; known settings: .*engine.*model"):
        build_config({**SETTINGS, "path": "m"})


def test_a_manifest_written_before_the_rename_reads():
    recorded = RecordedConfig.model_validate({"model": {"model": "./student", "dtype": "float32"}, "engine": {"engine": "local"}})
    assert (recorded.model.path, recorded.engine.name) == ("./student", "local")
    assert recorded.model_dump(mode="json", exclude_unset=True) == {"model": {"model": "./student", "dtype": "float32"}, "engine": {"engine": "local"}}


def test_old_attribute_names_work_and_warn():
    model, engine = ModelConfig(model="m"), EngineConfig(engine="ray")
    assert ModelConfig(path="m") == model and EngineConfig(name="ray") == engine
    with pytest.warns(DeprecationWarning, match="ModelConfig.model is deprecated; use ModelConfig.path"):
        assert model.model == "m"
    with pytest.warns(DeprecationWarning, match="EngineConfig.engine is deprecated; use EngineConfig.name"):
        assert engine.engine == "ray"
    with pytest.warns(DeprecationWarning, match="use ModelConfig.path"):
        model.model = "/abs/m"
    assert model.path == "/abs/m"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.path == "/abs/m" and engine.name == "ray"
