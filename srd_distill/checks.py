"""Checks ``srd-distill`` runs before training: loadable tokenizers, one shared vocabulary, sequences that fit.

Each check fails early with an error that says what is wrong and what to do, before any
model is trained or any file is written.

Example:
    >>> check_same_tokenizer(tok, tok, ["hello"], 512, 512)   # doctest: +SKIP
    512
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from srd_distill.errors import TokenizerMismatchError, TrainingSetupError

__all__ = ["load_tokenizer", "output_vocab_size", "check_same_tokenizer", "shared_tokenizer", "student_tokenizer", "check_context"]


def load_tokenizer(name: str, role: str) -> Any:
    """``AutoTokenizer.from_pretrained(name)``, with an error naming the ``role`` (teacher/student) when it fails.

    Example:
        >>> load_tokenizer("./student", "student")   # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(
            f"could not load the {role}'s tokenizer from {name!r}: pass a folder saved with save_pretrained "
            f"(model and tokenizer) or a reachable hub id ({err})"
        ) from err


def output_vocab_size(name: str, role: str) -> int:
    """Rows of the model's output layer (``config.vocab_size``), read without loading weights.

    Example:
        >>> output_vocab_size("./student", "student")   # doctest: +SKIP
        512
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"could not load the {role}'s config from {name!r} ({err})") from err
    size = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if size is None:
        raise TrainingSetupError(f"the {role} config of {name!r} has no vocab_size")
    return int(size)


def check_same_tokenizer(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    probe_texts: Sequence[str] = (),
    teacher_vocab_rows: Optional[int] = None,
    student_vocab_rows: Optional[int] = None,
) -> int:
    """Refuse a teacher/student pair that does not share one tokenizer; return the shared vocabulary size.

    KD compares the two next-token distributions entry by entry, so token id ``i`` must
    mean the same string in both models. Checked: the vocabularies (token -> id), the
    end-of-sequence id, the ids of ``probe_texts`` (same merges and normalisation), and
    that each model's output layer covers the vocabulary. Output layers may be *larger*
    than the tokenizer (padded embedding matrices): logits are sliced to the shared size.

    Example:
        >>> check_same_tokenizer(tok, tok, ["hello"], 512, 512)   # doctest: +SKIP
        512
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
        only_student = sorted(set(student_vocab) - set(teacher_vocab))
        moved = sorted(t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t])
        details = []
        if only_teacher:
            details.append(f"{len(only_teacher)} token(s) only in the teacher's, e.g. {only_teacher[:3]!r}")
        if only_student:
            details.append(f"{len(only_student)} token(s) only in the student's, e.g. {only_student[:3]!r}")
        if moved:
            t = moved[0]
            details.append(f"{len(moved)} token(s) with other ids, e.g. {t!r}: teacher {teacher_vocab[t]}, student {student_vocab[t]}")
        raise TokenizerMismatchError(
            f"teacher and student vocabularies differ (teacher {len(teacher_vocab)} tokens, student "
            f"{len(student_vocab)}): {'; '.join(details)}. White-box KD compares the two next-token "
            "distributions token by token, so both models must use the same tokenizer (same family, e.g. "
            "GPT-2 1.5B -> GPT-2 120M, Qwen2.5-7B -> Qwen2.5-0.5B)"
        )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise TokenizerMismatchError(
            f"teacher and student end-of-sequence tokens differ (teacher {teacher_tokenizer.eos_token!r} = "
            f"{teacher_tokenizer.eos_token_id}, student {student_tokenizer.eos_token!r} = {student_tokenizer.eos_token_id}); "
            "the reference is scored with one end-of-sequence id, so they must agree"
        )
    for text in probe_texts:
        a = teacher_tokenizer(text, add_special_tokens=True)["input_ids"]
        b = student_tokenizer(text, add_special_tokens=True)["input_ids"]
        if a != b:
            raise TokenizerMismatchError(
                f"teacher and student tokenizers share a vocabulary but encode text differently (other merges, "
                f"normalisation or special tokens), e.g. {text[:60]!r}: teacher {a[:12]}..., student {b[:12]}...; "
                "use the same tokenizer for both models"
            )
    shared = len(student_tokenizer)
    for role, rows in (("teacher", teacher_vocab_rows), ("student", student_vocab_rows)):
        if rows is not None and rows < shared:
            raise TokenizerMismatchError(
                f"the {role} model's output layer has {rows} rows but the tokenizer has {shared} tokens; "
                "the model cannot predict every token id of the data"
            )
    return shared



def shared_tokenizer(teacher: str, student: str, probe_texts: Sequence[str]) -> tuple[Any, int]:
    """Load both models' tokenizers, refuse them unless they are one (:func:`check_same_tokenizer`).

    Returns the student's tokenizer and the shared vocabulary size; nothing but configs and
    tokenizers is loaded.

    Example:
        >>> tokenizer, vocab_size = shared_tokenizer("./teacher", "./student", ["a probe text"])   # doctest: +SKIP
    """
    tokenizer = load_tokenizer(student, "student")
    vocab_size = check_same_tokenizer(load_tokenizer(teacher, "teacher"), tokenizer, probe_texts,
                                      output_vocab_size(teacher, "teacher"), output_vocab_size(student, "student"))
    return tokenizer, vocab_size


def student_tokenizer(student: str) -> tuple[Any, int]:
    """The student's tokenizer and its size, its output layer checked to cover it (no teacher model: ``--teacher-logits``).

    Example:
        >>> tokenizer, vocab_size = student_tokenizer("./student")   # doctest: +SKIP
    """
    tokenizer = load_tokenizer(student, "student")
    return tokenizer, check_same_tokenizer(tokenizer, tokenizer, (), None, output_vocab_size(student, "student"))


def check_context(student: torch.nn.Module, teacher: Optional[torch.nn.Module], longest: int) -> None:
    """Refuse sequences longer than a model's position table (they would fail deep inside the forward pass).

    Example:
        >>> check_context(student, teacher, longest=2048)   # doctest: +SKIP
    """
    for role, model in (("student", student), ("teacher", teacher)):
        if model is None:  # cached teacher logits: `srdata teach` checked the teacher's context
            continue
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(context, int) and longest > context:
            raise TrainingSetupError(f"the longest training sequence has {longest} tokens but the {role} takes at most "
                                     f"{context} positions; pass --max-length {context} (or less)")

