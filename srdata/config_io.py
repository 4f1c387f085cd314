"""Reading settings: config files (YAML, TOML, JSON), readable validation errors, a model with keyword overrides.

Used by every settings model of both packages (:mod:`srdata.config`'s trees, srd-distill's
``TrainSettings``); :mod:`srdata.config` re-exports these names.

Example:
    >>> parse_config_file("train.yaml")     # doctest: +SKIP
    {'lr': 0.0003, 'run': {'output': 'runs/kd'}}
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be read; the message names the file, the line and the problem."""


def _line_of(text: str, key: str, occurrence: int) -> int | None:
    """The line of the ``occurrence``-th (0-based) ``"key":`` in a JSON text, for an error message."""
    import re

    hits = [m.start() for m in re.finditer(rf'"{re.escape(key)}"\s*:', text)]
    return text.count("\n", 0, hits[occurrence]) + 1 if len(hits) > occurrence else None


def _parse_json(text: str, path: Path) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            line = _line_of(text, twice, 1)
            raise ConfigFileError(f"config file {path}{f' line {line}' if line else ''}: key {twice!r} appears twice in one object; keep one")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as err:
        raise ConfigFileError(f"config file {path} line {err.lineno} column {err.colno}: {err.msg} (not valid JSON)") from None


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last one)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merged keys (<<: *defaults) may be overridden: YAML's rule
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.MarkedYAMLError(None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeys) or {}  # a SafeLoader: builds plain data only, runs no code
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigFileError(f"config file {path}{where}: {problem} (not valid YAML)") from None


def parse_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into a mapping of settings (flat or in sections, as written).

    Syntax errors and a key given twice are :class:`ConfigFileError` naming the file (and
    the line where the parser knows it); :func:`srdata.config.read_config_file` places the
    settings in their sections.

    Example:
        >>> parse_config_file("score.yaml")     # doctest: +SKIP
        {'max_new_tokens': 128, 'model': {'model': './student'}}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigFileError(f"config file {path} line {line} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            raw = tomllib.loads(text)  # a key given twice is a TOML error already
        except tomllib.TOMLDecodeError as err:
            raise ConfigFileError(f"config file {path}: {err} (not valid TOML)") from None
    elif suffix == ".json":
        raw = _parse_json(text, path)
    elif suffix in (".yaml", ".yml"):
        raw = _parse_yaml(text, path)
    else:
        raise ConfigFileError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    if not isinstance(raw, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of settings, got {type(raw).__name__}")
    return raw


BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def validation_problems(
    err: ValidationError, name: Callable[[tuple[Any, ...]], str] = lambda loc: ".".join(map(str, loc)), plain_bounds: bool = False
) -> list[str]:
    """One line per problem of a pydantic ``ValidationError``: where, what, and the value given.

    ``name`` turns a location into what the user knows it by (``generation.max_new_tokens``,
    ``--max-new-tokens``); ``plain_bounds`` words a bound as ``must be >= 1, got 0``. Used by
    every settings model (score, export, srd-distill), the CLI and the manifest reader.

    Example:
        >>> from srdata.config import GenerationConfig
        >>> try:
        ...     GenerationConfig(max_new_tokens=0)
        ... except ValidationError as err:
        ...     validation_problems(err, plain_bounds=True)
        ['max_new_tokens must be >= 1, got 0']
    """
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a rule about several settings together: its message says it all
            lines.append(e["msg"].removeprefix("Value error, "))
        elif plain_bounds and e["type"] in BOUNDS:
            lines.append(f"{name(e['loc'])} must be {BOUNDS[e['type']]} {next(iter(e['ctx'].values()))}, got {e['input']}")
        else:
            got = "" if e["type"] == "missing" else f" (got {repr(e['input'])[:80]})"
            lines.append(f"{name(e['loc'])}: {e['msg']}{got}")
    return lines


M = TypeVar("M", bound=BaseModel)


def command_settings(model: type[M], config: M | dict[str, Any] | None, overrides: dict[str, Any], error: type[ValueError]) -> M:
    """``config`` (a ``model``, a dict or None) with keyword ``overrides``, validated once: what a command's function runs with.

    A problem a validator found (a :class:`CurriculumError`, a :class:`RankingError`) is raised
    as itself, with the message the CLI shows; any other is an ``error`` naming every setting.

    Example:
        >>> from srdata.config import RankConfig
        >>> command_settings(RankConfig, RankConfig(ties="reference"), {"rrf_k": 10}, ValueError).rrf_k
        10
    """
    values = {name: getattr(config, name) for name in model.model_fields} if isinstance(config, model) else dict(config or {})
    try:
        return model.model_validate({**values, **overrides})
    except ValidationError as err:
        for problem in err.errors():
            cause = (problem.get("ctx") or {}).get("error")
            if isinstance(cause, ValueError) and type(cause) is not ValueError:
                raise cause from None
        raise error("invalid settings: " + "; ".join(validation_problems(err, plain_bounds=True))) from None


def setting_names(model: type[BaseModel]) -> dict[str, str]:
    """Each field's setting name (its flag, config-file and manifest key: the alias where it has one) -> field name.

    Example:
        >>> from srdata.config import EngineConfig
        >>> setting_names(EngineConfig)["engine"]
        'name'
    """
    return {field.alias or name: name for name, field in model.model_fields.items()}
