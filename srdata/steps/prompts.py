"""Render each row into the exact prompt string the student sees, and pick its reference.

Templates:
* ``auto`` (the default): ``chat`` when the tokenizer has a chat template (instruct
  models), else ``alpaca``; chat ``messages`` datasets always use ``chat``.
* ``alpaca``: the SRD reference code's format ("Below is an instruction ...", with an
  ``### Input:`` block when the input/context column is non-empty).
* ``raw``: the prompt column as it is.
* ``chat``: the tokenizer's chat template with the generation prompt added.
* any other string: a Python format string with ``{column}`` fields, e.g.
  ``"Question: {question}\\nAnswer: "``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Optional

from srdata.steps.dataset import ColumnMapping

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NAMED_TEMPLATES = ("alpaca", "raw", "chat")
AUTO = "auto"


class TemplateError(ValueError):
    """The template does not fit the dataset or tokenizer."""


@dataclass(frozen=True)
class RenderedRow:
    """The prompt string and reference of one row, or why the row cannot be scored."""

    prompt_text: Optional[str]
    reference: Optional[str]
    invalid_reason: Optional[str] = None


def resolve_template(template: str | None, mapping: ColumnMapping, column_names: list[str], tokenizer: Any = None) -> str:
    """Resolve ``auto`` (or None) and check that the chosen template can be rendered.

    ``auto`` is ``chat`` for chat ``messages`` datasets and for tokenizers that carry a
    chat template (an instruct model expects its own turn format), else ``alpaca``.

    Example:
        >>> resolve_template("Q: {question}", ColumnMapping("question", "answer"), ["question", "answer"])
        'Q: {question}'
        >>> resolve_template("auto", ColumnMapping("instruction", "output"), ["instruction", "output"])
        'alpaca'
    """
    if template is None or template == AUTO:
        template = "chat" if mapping.messages_column or has_chat_template(tokenizer) else "alpaca"
    if template == "chat":
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError("--template chat needs a tokenizer with a chat template, and this tokenizer has none; use --template alpaca or raw")
        return template
    if mapping.messages_column:
        raise TemplateError(
            f"the dataset holds chat messages (column '{mapping.messages_column}'), which only --template chat can render"
        )
    if template in NAMED_TEMPLATES:
        return template
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise TemplateError(f"template {template!r} is not a valid format string: {err}") from err
    if not fields:
        raise TemplateError(
            f"template {template!r} is not one of {', '.join(NAMED_TEMPLATES)} and has no {{column}} field"
        )
    unknown = [f for f in fields if f not in column_names]
    if unknown:
        raise TemplateError(
            f"template field(s) {', '.join('{' + f + '}' for f in unknown)} are not columns of the dataset; "
            f"available columns: {', '.join(column_names)}"
        )
    return template


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (what ``--template auto`` looks at)."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def describe_template(requested: str | None, resolved: str, mapping: ColumnMapping) -> str:
    """One line for the run's output: which template renders the prompts, and why.

    Example:
        >>> describe_template("auto", "alpaca", ColumnMapping("instruction", "output"))
        'template: alpaca (auto: the tokenizer has no chat template; --template chooses another)'
    """
    if requested not in (None, AUTO):
        return f"template: {resolved}"
    if mapping.messages_column:
        why = "the dataset holds chat messages"
    elif resolved == "chat":
        why = "the tokenizer has a chat template"
    else:
        why = "the tokenizer has no chat template"
    return f"template: {resolved} (auto: {why}; --template chooses another)"


def resolved_config(config: Any, mapping: ColumnMapping, template: str) -> Any:
    """``config`` (a :class:`~srdata.config.ScoreConfig`) with the run's concrete template and columns in it.

    ``srdata.pipeline.score`` resolves ``--template auto`` and the auto-detected columns once
    and passes this config on: shards, engines, Ray replicas and the manifest read the
    template from ``config.prompt.template`` and the columns with
    :func:`srdata.steps.dataset.column_mapping`, never from a separate argument.

    Example:
        >>> from srdata.config import build_config
        >>> config = build_config(dict(dataset="d.jsonl", model="m", output="o"))
        >>> resolved_config(config, ColumnMapping("instruction", "output"), "alpaca").prompt.template
        'alpaca'
    """
    columns = {"prompt_column": mapping.prompt_column, "response_column": mapping.response_column,
               "input_column": mapping.input_column, "messages_column": mapping.messages_column}
    return config.model_copy(update={"data": config.data.model_copy(update=columns),
                                     "prompt": config.prompt.model_copy(update={"template": template})})


CHAT_SENTINEL = "SRDATA-CONTENT-7f3a9c"


def chat_affixes(tokenizer: Any) -> tuple[str, str]:
    """The chat template's own text before and after a single user turn's content.

    For ChatML (SmolLM2, Qwen): the system turn and ``<|im_start|>user\n`` before, and
    ``<|im_end|>\n<|im_start|>assistant\n`` after. Truncation keeps both (see
    :func:`srdata.steps.tokenize.encode_pairs`'s ``keep``). ``("", "")`` when the template does
    not show the content verbatim.

    Example:
        >>> chat_affixes(tokenizer)  # doctest: +SKIP
        ('<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n', '<|im_end|>\n<|im_start|>assistant\n')
    """
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_SENTINEL}], add_generation_prompt=True, tokenize=False)
    if text.count(CHAT_SENTINEL) != 1:
        return "", ""
    head, tail = text.split(CHAT_SENTINEL)
    return head, tail


def render_rows(rows: dict[str, list], mapping: ColumnMapping, template: str, tokenizer: Any = None) -> list[RenderedRow]:
    """Render a column-oriented batch of rows (as ``Dataset[a:b]`` returns) into prompts.

    Example:
        >>> m = ColumnMapping("instruction", "output", "input")
        >>> r = render_rows({"instruction": ["Add"], "input": [""], "output": ["3"]}, m, "alpaca")
        >>> r[0].prompt_text.endswith("### Response:\\n"), r[0].reference
        (True, '3')
    """
    n = len(next(iter(rows.values()))) if rows else 0
    out = []
    for i in range(n):
        row = {name: values[i] for name, values in rows.items()}
        out.append(_render_row(row, mapping, template, tokenizer))
    return out


def unconditional_prompt(template: str, mapping: ColumnMapping, tokenizer: Any = None) -> str:
    """The prompt string of a row whose prompt (and input) is empty, in ``template``.

    It conditions ``ce_loss_uncond``, the reference's cross-entropy without the prompt's
    content but with everything the template adds around it, so that ``ifd = ce_loss /
    ce_loss_uncond`` measures what the prompt's *content* tells the student:

    * ``chat`` (and chat ``messages`` datasets): the chat template applied to one empty
      user turn, with the generation prompt (for ChatML: the system turn, an empty user
      turn, then the assistant header);
    * ``alpaca``: the instruction form with an empty instruction and no input block;
    * ``raw``: the empty string;
    * a format string: every ``{column}`` field empty.

    Example:
        >>> unconditional_prompt("Q: {question}\\nA: ", ColumnMapping("question", "answer"))
        'Q: \\nA: '
        >>> unconditional_prompt("alpaca", ColumnMapping("instruction", "output")).endswith("### Instruction:\\n\\n\\n### Response:\\n")
        True
    """
    if mapping.messages_column or template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the unconditional prompt of --template chat needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    if template == "alpaca":
        return ALPACA.format(instruction="")
    if template == "raw":
        return ""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    return template.format_map({name: "" for name in fields})


def _text(row: dict, column: str) -> tuple[Optional[str], Optional[str]]:
    """Value of a text column, or why it is unusable."""
    value = row.get(column)
    if value is None:
        return None, f"column '{column}' is null"
    if not isinstance(value, str):
        return None, f"column '{column}' holds {type(value).__name__}, not text"
    return value, None


def row_problem(row: dict, mapping: ColumnMapping) -> Optional[str]:
    """Why a row cannot be scored (null, non-text or empty prompt, unusable reference), or None.

    An empty reference is fine: it is scored on the end-of-sequence token alone.
    """
    if mapping.messages_column:
        return _messages_problem(row.get(mapping.messages_column), mapping.messages_column)
    _, problem = _text(row, mapping.response_column)
    if problem:
        return problem
    prompt, problem = _text(row, mapping.prompt_column)
    if problem:
        return problem
    if not prompt.strip():
        return f"column '{mapping.prompt_column}' is empty"
    if mapping.input_column:
        value = row.get(mapping.input_column)
        if value is not None and not isinstance(value, str):
            return f"column '{mapping.input_column}' holds {type(value).__name__}, not text"
    return None


def chat_messages(row: dict, mapping: ColumnMapping) -> list[dict[str, str]]:
    """The conversation that ``--template chat`` renders for a row, ending with the reference
    as the assistant's turn: the history of a ``messages`` column, or one user turn (the
    prompt, then the input/context after a blank line).

    A trainer that applies the chat template itself (TRL's SFT/GKD trainers on
    ``messages``) must get these turns, not ``prompt_text``, which is already rendered.

    Example:
        >>> chat_messages({"q": "Add 1 and 2", "ctx": "", "a": "3"}, ColumnMapping("q", "a", "ctx"))
        [{'role': 'user', 'content': 'Add 1 and 2'}, {'role': 'assistant', 'content': '3'}]
    """
    if mapping.messages_column:
        return [{"role": m["role"], "content": m["content"]} for m in row[mapping.messages_column]]
    prompt = row[mapping.prompt_column]
    extra = (row.get(mapping.input_column) or "") if mapping.input_column else ""
    content = f"{prompt}\n\n{extra}" if extra.strip() else prompt
    return [{"role": "user", "content": content}, {"role": "assistant", "content": row[mapping.response_column]}]


def _render_row(row: dict, mapping: ColumnMapping, template: str, tokenizer: Any) -> RenderedRow:
    problem = row_problem(row, mapping)
    if problem:
        return RenderedRow(None, None, problem)
    if mapping.messages_column or template == "chat":
        *history, answer = chat_messages(row, mapping)
        text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        return RenderedRow(text, answer["content"])
    prompt, reference = row[mapping.prompt_column], row[mapping.response_column]
    extra = (row.get(mapping.input_column) or "") if mapping.input_column else ""
    if template == "alpaca":
        text = ALPACA_WITH_INPUT.format(instruction=prompt, input=extra) if extra.strip() else ALPACA.format(instruction=prompt)
    elif template == "raw":
        text = prompt
    else:
        values = {k: ("" if v is None else v) for k, v in row.items()}
        text = template.format_map(values)
    return RenderedRow(text, reference)


def _messages_problem(messages: Any, column: str) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return f"column '{column}' is not a non-empty list of messages"
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        return f"column '{column}' has a message without 'role' and 'content'"
    last = messages[-1]
    if last["role"] != "assistant":
        return f"column '{column}': the last message is from '{last['role']}', not the assistant"
    if not isinstance(last["content"], str):
        return f"column '{column}': the assistant's content is not text"
    if len(messages) < 2:
        return f"column '{column}' has no message before the assistant's answer"
    return None
