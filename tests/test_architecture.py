"""The architecture rules of issue 17, checked on the source so that they stay true.

* every module is small enough to read (about 500 lines; the vLLM backend a little more);
* no import cycle between modules (function-local imports count too);
* no module imports another module's private (underscore) names;
* torch, transformers and vLLM are imported at module top only inside ``srdata/backends``
  (``import srdata`` stays light; srd_distill is a torch package and may);
* srdata never imports srd_distill at module top (srdata works without it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("srdata", "srd_distill")
MAX_LINES = 500
HEAVY = ("torch", "transformers", "vllm")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports inside `if TYPE_CHECKING:` / try blocks at module level are top-level
        nodes = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def in_type_checking_block(path: Path) -> set[int]:
    """Lines of imports under ``if TYPE_CHECKING:`` (never executed)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            lines.update(n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lines


def resolve(target: str, names: list[str]) -> list[str]:
    """The project modules an import loads: ``from srdata.steps import rank`` is srdata.steps.rank."""
    modules = [f"{target}.{name}" for name in names if f"{target}.{name}" in SOURCES]
    if target in SOURCES and len(modules) < len(names):
        modules.append(target)
    return modules


def test_every_module_is_small_enough_to_read():
    too_long = {}
    for name, path in SOURCES.items():
        relative = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            too_long[relative] = lines
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_import_cycle():
    # The package facades (srdata/__init__, srd_distill/__init__) re-export lazily or for users;
    # an edge into them is not an edge into the modules behind them.
    facades = set(PACKAGES)
    graph = {
        name: {m for target, names, _ in imports(path) for m in resolve(target, names) if m != name and m not in facades}
        for name, path in SOURCES.items()
        if name not in facades
    }
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in seen:
                visit(nxt, [*trail, nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    offenders = []
    for name, path in SOURCES.items():
        for target, names, line in imports(path):
            if target.split(".")[0] in PACKAGES and target != name:
                offenders += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", ["srdata"])
def test_heavy_libraries_are_imported_at_module_top_only_in_backends(package):
    offenders = []
    for name, path in SOURCES.items():
        if not name.startswith(package) or name.startswith("srdata.backends"):
            continue
        skipped = in_type_checking_block(path)
        for target, _, line in imports(path, top_level_only=True):
            if line in skipped:
                continue
            if target.split(".")[0] in HEAVY or target.split(".")[0] == "srd_distill":
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {target} at module top")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------- registries (issue 26, item 3)
REGISTRY_MODULES = {"srdata.backends.registry", "srdata.engines"}


def registered_names() -> dict[str, set[str]]:
    from srdata.backends.registry import BACKEND_CHOICES
    from srdata.engines import ENGINES

    return {"backend": set(BACKEND_CHOICES), "engine": set(ENGINES)}


def test_backend_and_engine_names_come_only_from_their_registries():
    """No Literal, tuple, list, set or dict of backend (or engine) names outside the registry that holds them."""
    import typing

    from srdata.backends.registry import BACKEND_CHOICES
    from srdata.config import EngineConfig, ModelConfig
    from srdata.engines import ENGINES

    assert typing.get_args(ModelConfig.model_fields["backend"].annotation) == BACKEND_CHOICES
    assert typing.get_args(EngineConfig.model_fields["name"].annotation) == tuple(ENGINES)
    offenders = []
    for name, path in SOURCES.items():
        if name in REGISTRY_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                elements = node.elts
            elif isinstance(node, ast.Dict):
                elements = [key for key in node.keys if key is not None]
            else:
                continue
            strings = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            for kind, names in registered_names().items():
                if len(strings & names) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} lists {kind} names {sorted(strings & names)}")
    assert not offenders, "name them in the registry only (srdata/backends/registry.py, srdata/engines/__init__.py):\n" + "\n".join(offenders)


def test_no_vllm_special_case_outside_backends():
    """``== "vllm"``, ``in (..., "vllm")`` or a list naming it belongs in srdata/backends; elsewhere ask the backend (its protocol)."""

    def is_vllm(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_vllm(e) for e in node.elts)
        return isinstance(node, ast.Constant) and node.value == "vllm"

    offenders = []
    for name, path in SOURCES.items():
        if name.startswith("srdata.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(is_vllm(side) for side in [node.left, *node.comparators]):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with 'vllm'")
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and is_vllm(node):  # e.g. a package list: Backend.packages
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} lists 'vllm'")
    assert not offenders, "\n".join(offenders)


PROTOCOL_METHODS = ("from_config", "context_length", "close", "generate", "score", "score_top_k", "score_and_generate")


@pytest.mark.parametrize("name", sorted(__import__("srdata.backends.registry", fromlist=["BACKENDS"]).BACKENDS))
def test_every_registered_backend_satisfies_the_protocol(name):
    import inspect

    from srdata.backends import Backend, backend_class

    cls = backend_class(name)  # imports the module, never the optional engine (vLLM is imported when one starts)
    for method in PROTOCOL_METHODS:
        assert callable(getattr(cls, method, None)), f"{cls.__name__} has no {method}"
        expected = list(inspect.signature(getattr(Backend, method)).parameters)
        got = list(inspect.signature(getattr(cls, method)).parameters)
        assert got[: len(expected)] == expected, f"{cls.__name__}.{method}{got} does not take the protocol's {expected}"
    for method in ("from_config", "context_length"):  # asked before any instance exists
        assert isinstance(inspect.getattr_static(cls, method), classmethod), f"{cls.__name__}.{method} is not a classmethod"
    assert cls.packages and all(isinstance(p, str) for p in cls.packages), f"{cls.__name__}.packages names no package"


def test_the_registries_import_no_backend_or_engine():
    """Reading the names (srdata.config does) imports no backend and no engine module: they load when a run uses them."""
    import subprocess
    import sys

    code = (
        "import sys, srdata.config, srdata.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'ray') or m in "
        "('srdata.backends.hf', 'srdata.backends.vllm', 'srdata.engines.local', 'srdata.engines.ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_public_name_means_two_things_across_srdata_and_srd_distill():
    """A class or function defined at the top of a module in both packages is one concept or a trap (issue 26 item 7:
    StagePlan/plan_stages, ModelConfig, TeacherConfig were). The few left are the same job on each side."""
    import ast

    same_job = {"main", "check_output_folder", "load_tokenizer", "package_versions"}  # each package's CLI / own folder
    where: dict[str, set[str]] = {}
    for package in ("srdata", "srd_distill"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"):
                    where.setdefault(node.name, set()).add(package)
    twice = {name for name, packages in where.items() if len(packages) == 2} - same_job
    assert not twice, f"defined in both srdata and srd_distill: {sorted(twice)}; rename one (keep the old name deprecated)"


def test_one_encoding_rule_for_srdata_and_srd_distill():
    """Issue 26 item 2: the chat encoding decisions (``add_special_tokens``, what truncation keeps whole) are made by
    ``srdata.steps.tokenize.prompt_encoding`` alone; srdata's shard encoding and srd-distill's data reading call it."""
    rule = ROOT / "srdata" / "steps" / "tokenize.py"
    simple = (ast.Constant, ast.Name, ast.Attribute, ast.Subscript)  # a value passed on, not a decision made here
    callers, problems = set(), []
    for path in SOURCES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name == "prompt_encoding":
                callers.add(path.relative_to(ROOT).as_posix())
            if path == rule:
                continue
            if name == "chat_affixes":
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} calls chat_affixes")
            for keyword in node.keywords:
                encodes = name in ("encode_pairs", "unconditional_prompt_ids")
                decided = keyword.arg == "add_special_tokens" or (keyword.arg == "keep" and encodes)
                if decided and not isinstance(keyword.value, simple):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} decides {keyword.arg}= itself")
    assert not problems, "encoding decisions outside srdata.steps.tokenize.prompt_encoding: " + "; ".join(problems)
    assert {"srdata/shard.py", "srd_distill/data.py"} <= callers, f"prompt_encoding is called from {sorted(callers)} only"


def test_adding_a_backend_touches_only_the_registry(tmp_path):
    """One line in a copy of srdata/backends/registry.py makes a new backend a --backend choice that
    load_backend builds, whose context length and packages callers use."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "srdata", tmp_path / "srdata", ignore=shutil.ignore_patterns("__pycache__"))
    registry = tmp_path / "srdata" / "backends" / "registry.py"
    line = '    "vllm": "srdata.backends.vllm:VLLMBackend",'
    text = registry.read_text(encoding="utf-8")
    assert text.count(line) == 1
    registry.write_text(text.replace(line, line + '\n    "toy": "toy_backend:ToyBackend",'), encoding="utf-8")
    (tmp_path / "toy_backend.py").write_text(
        "from srdata.backends.base import Backend\n\n\n"
        "class ToyBackend(Backend):\n"
        "    packages = ('toy-package',)\n\n"
        "    @classmethod\n"
        "    def from_config(cls, config, tokenizer=None):\n"
        "        return cls()\n\n"
        "    @classmethod\n"
        "    def context_length(cls, config):\n"
        "        return 77\n",
        encoding="utf-8",
    )
    code = (
        "import srdata, srdata.cli\n"
        "from srdata.backends import backend_class, backend_packages, load_backend\n"
        "from srdata.config import build_config\n"
        "assert srdata.__file__.startswith(r'%s'), srdata.__file__\n"
        "option = next(p for p in srdata.cli.main.commands['score'].params if p.name == 'backend')\n"
        "config = build_config(dict(dataset='d.jsonl', model='m', output='o', device='cpu', backend='toy'))\n"
        "backend = load_backend(config)\n"
        "print(list(option.type.choices), type(backend).__name__, backend_class('toy').context_length(config), backend_packages()[-1])\n"
        "backend.close()\n"
    ) % tmp_path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["['auto',", "'hf',", "'vllm',", "'toy']", "ToyBackend", "77", "toy-package"], out.stdout


@pytest.mark.parametrize("old, new, name", [
    ("srdata.steps.load", "srdata.steps.dataset", "load_split"),
    ("srdata.curriculum.load", "srdata.curriculum.reader", "load_curriculum"),
    ("srd_distill.testbed", "srd_distill.testbed_models", "train_teacher"),
])
def test_renamed_modules_keep_their_old_import_path(old, new, name):
    """Issue 26 item 7: the two load.py and two testbed.py got names that say what they hold; the old path
    still imports (every name read from the new module) and warns naming the new one."""
    import subprocess
    import sys

    assert (ROOT / Path(*old.split("."))).with_suffix(".py").read_text(encoding="utf-8").count("\n") < 25  # a shim only
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == repr([f"{old} is deprecated; use {new}"]), out.stdout
