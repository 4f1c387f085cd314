"""Models for the controlled SRD testbed (:mod:`srdata.demo.testbed`): teacher, student, evaluation.

* :func:`train_teacher`: a character-level Llama fine-tuned (cross-entropy on responses)
  on *clean* pairs of the testbed's task distribution, the stand-in for the paper's SFT
  teacher; it never sees the noisy training responses.
* :func:`warm_up_student`: a smaller Llama given a short warm-up on other clean pairs, so
  it knows the format and the easy cells but is weak on the hard ones, like a pretrained
  student before distillation.
* :func:`evaluate_model`: greedy answers on a test set (srdata's HF backend, the code
  ``srdata score`` and ``srd-distill`` use), exact match and ROUGE-L
  (:func:`srdata.rouge_l`) per row, and means per task, per difficulty level and overall.

Example:
    >>> from srdata.demo.testbed import build_testbed, TestbedSpec
    >>> files = build_testbed("/tmp/tb", TestbedSpec(train_pairs=400))                  # doctest: +SKIP
    >>> teacher = train_teacher("/tmp/tb/teacher", files.teacher_sft, teacher_recipe())   # doctest: +SKIP
    >>> evaluate_model(teacher, files.test)["overall"]["exact_match"]                   # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from srdata.deprecation import renamed_names

__all__ = ["TinyModelRecipe", "teacher_recipe", "student_recipe", "train_teacher", "warm_up_student", "evaluate_model", "summarise"]


@dataclass(frozen=True)
class TinyModelRecipe:
    """Architecture and supervised training of one character-level testbed model.

    (Not srdata's :class:`srdata.config.ModelConfig`, the scoring model's settings; this was
    called ``ModelConfig`` before, a name still importable with a DeprecationWarning.)
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 0
    arch: str = "llama"

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def teacher_recipe(**overrides: Any) -> TinyModelRecipe:
    """The testbed teacher: Llama, 4 layers, hidden 128 (about 1.1M parameters), 1,000 steps of 64 pairs.

    Example:
        >>> teacher_recipe(steps=100).num_layers
        4
    """
    return TinyModelRecipe(**{**dict(hidden_size=128, num_layers=4, num_heads=4, steps=1000, batch_size=64, lr=2e-3, warmup_steps=100), **overrides})


def student_recipe(**overrides: Any) -> TinyModelRecipe:
    """The testbed student: Llama, 2 layers, hidden 64 (about 0.1M parameters), a 300-step warm-up.

    Example:
        >>> student_recipe().hidden_size
        64
    """
    return TinyModelRecipe(**{**dict(hidden_size=64, num_layers=2, num_heads=4, steps=300, batch_size=64, lr=3e-3, warmup_steps=50), **overrides})


def _read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    from srdata.demo.testbed import read_jsonl

    rows = read_jsonl(path)
    return [r["prompt"] for r in rows], [r["response"] for r in rows]


def _fit(path: Path, data_file: str | Path, config: TinyModelRecipe, seed: int, echo: Callable[[str], None]) -> float:
    from srdata.demo.tiny import build_char_model, train_on_pairs

    started = time.perf_counter()
    build_char_model(path, config.arch, hidden_size=config.hidden_size, num_layers=config.num_layers,  # type: ignore[arg-type]
                     num_heads=config.num_heads, seed=seed)
    prompts, responses = _read_pairs(data_file)
    train_on_pairs(path, prompts, responses, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                   warmup_steps=config.warmup_steps, seed=seed, log_every=max(1, config.steps // 5), echo=echo)
    return time.perf_counter() - started


def train_teacher(path: str | Path, data_file: str | Path, config: TinyModelRecipe, seed: int = 0,
                  echo: Callable[[str], None] = print) -> Path:
    """Build and fine-tune the teacher at ``path`` on the clean pairs of ``data_file``.

    Example:
        >>> train_teacher("/tmp/tb/teacher", "/tmp/tb/teacher_sft.jsonl", teacher_recipe(steps=50))   # doctest: +SKIP
        PosixPath('/tmp/tb/teacher')
    """
    path = Path(path)
    seconds = _fit(path, data_file, config, seed, echo)
    echo(f"teacher trained in {seconds:.0f}s: {path}")
    return path


def warm_up_student(path: str | Path, data_file: str | Path, config: TinyModelRecipe, seed: int = 0,
                    echo: Callable[[str], None] = print) -> Path:
    """Build the student at ``path`` (initialised with ``seed``) and give it a short warm-up on ``data_file``.

    Example:
        >>> warm_up_student("/tmp/tb/student", "/tmp/tb/warmup.jsonl", student_recipe(), seed=1)   # doctest: +SKIP
        PosixPath('/tmp/tb/student')
    """
    path = Path(path)
    seconds = _fit(path, data_file, config, seed, echo)
    echo(f"student warmed up in {seconds:.0f}s: {path}")
    return path


def evaluate_model(
    model_dir: str | Path,
    data_file: str | Path,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Greedy answers of the model on every row of ``data_file``, scored against its responses.

    Returns ``{"overall": {...}, "by_difficulty": {level: {...}}, "by_task": {task: {...}},
    "rows": n, "seconds": s}`` where each ``{...}`` holds ``exact_match`` and ``rouge_l``
    means (ROUGE-L F1 in [0, 1], :func:`srdata.rouge_l`, identical to ``rouge-score``).
    Exact match compares the answer and the reference with surrounding whitespace removed.

    Example:
        >>> evaluate_model("runs/kd/stage-2", "testbed/test.jsonl")["by_difficulty"]["4"]["exact_match"]   # doctest: +SKIP
        0.41
    """
    from srdata.backends.base import GenerationParams
    from srdata.backends.hf import HFBackend
    from srdata.steps.rouge import rouge_l
    from srdata.demo.testbed import read_jsonl
    from srdata.steps.tokenize import encode_pairs, resolve_eos_id

    started = time.perf_counter()
    rows = read_jsonl(data_file)
    backend = HFBackend.from_pretrained(model_dir, device=device, dtype="float32", batch_size=batch_size)
    tokenizer = backend.tokenizer
    encoded = encode_pairs(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                           max_prompt_tokens=10_000, max_reference_tokens=None)
    params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=(resolve_eos_id(tokenizer),))
    answers = [g.text for g in backend.generate([p.prompt_ids for p in encoded], params)]
    references = [r["response"] for r in rows]
    rouge = rouge_l(answers, references)
    scored = [
        {"task": r["task"], "difficulty": int(r["difficulty"]), "exact_match": float(a.strip() == ref.strip()), "rouge_l": float(s)}
        for r, a, ref, s in zip(rows, answers, references, rouge)
    ]
    result = summarise(scored)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def summarise(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of ``exact_match`` and ``rouge_l`` overall, per ``difficulty`` and per ``task``.

    Example:
        >>> summarise([{"task": "copy", "difficulty": 1, "exact_match": 1.0, "rouge_l": 1.0},
        ...            {"task": "add", "difficulty": 2, "exact_match": 0.0, "rouge_l": 0.5}])["overall"]
        {'exact_match': 0.5, 'rouge_l': 0.75, 'rows': 2}
    """

    def means(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(items)
        return {
            "exact_match": sum(i["exact_match"] for i in items) / n if n else float("nan"),
            "rouge_l": sum(i["rouge_l"] for i in items) / n if n else float("nan"),
            "rows": n,
        }

    def grouped(key: str) -> dict[str, dict[str, Any]]:
        values = sorted({i[key] for i in scored})  # keys as text: the same before and after a JSON round trip
        return {str(v): means([i for i in scored if i[key] == v]) for v in values}

    return {"overall": means(scored), "by_difficulty": grouped("difficulty"), "by_task": grouped("task"), "rows": len(scored)}


def model_parameters(model_dir: str | Path) -> Optional[int]:
    """Number of parameters of a saved model (read from its safetensors header when possible).

    Example:
        >>> model_parameters("runs/tb/teacher")   # doctest: +SKIP
        812416
    """
    import json
    import struct

    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        return None
    with weights.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        total += count
    return total


# Old names: ModelConfig and TeacherConfig clashed with srdata.config's settings models (StudentConfig went with them).
_RENAMED = {"ModelConfig": "TinyModelRecipe", "TeacherConfig": "teacher_recipe", "StudentConfig": "student_recipe"}


__getattr__ = renamed_names(__name__, _RENAMED, globals())
