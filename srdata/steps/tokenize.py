"""Tokenization rules shared by the scorer and by srd_distill (one source of truth).

The model sees ``prompt_ids + reference_ids``:

* ``prompt_ids``: the rendered prompt with the tokenizer's normal special tokens (BOS
  where the model uses one). Chat-template prompts already contain their special tokens,
  so they are encoded with ``add_special_tokens=False``.
* ``reference_ids``: the reference tokenized *on its own* with no special tokens, then the
  end-of-sequence id appended, so the cross-entropy also rewards knowing when to stop.

Prompts longer than ``max_prompt_tokens`` are truncated and flagged. The default
``truncation_side="left"`` drops the *start* of the prompt and keeps the end, which holds
the ``### Response:`` marker next to the answer; special tokens the tokenizer adds (BOS)
are always kept. ``truncation_side="right"`` keeps the start instead, as the SRD
reference code does. References longer than ``max_reference_tokens`` (end-of-sequence
included) are cut at that length and flagged; the cut reference then has no EOS.

Chat-template prompts have text of their own around the user's content (a system turn
and the user header before it; the end of the user turn and the assistant header after
it). Truncation must not cut it: without the assistant header the model would go on
writing the user's text. ``keep=(head, tail)`` names that text (see
:func:`srdata.steps.prompts.chat_affixes`); a truncated prompt keeps it whole and cuts only the
content between, on ``truncation_side``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from srdata.steps.prompts import chat_affixes

TruncationSide = Literal["left", "right"]


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one prompt/reference pair, with truncation flags."""

    prompt_ids: list[int]
    reference_ids: list[int]
    prompt_truncated: bool
    reference_truncated: bool


def resolve_eos_id(tokenizer: Any) -> int:
    """The id appended to every reference: the tokenizer's end-of-sequence token.

    Raises a ValueError naming the fix when the tokenizer has none.
    """
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError(
            "the tokenizer has no end-of-sequence token (tokenizer.eos_token is None); "
            "the reference's cross-entropy includes the end-of-sequence token, so set one "
            "with --eos-token TOKEN (an existing token of the vocabulary, e.g. '</s>')"
        )
    return int(eos_id)


def prompt_encoding(
    template: str | None, tokenizer: Any = None, *, max_prompt_tokens: int = 256, truncation_side: TruncationSide = "left"
) -> dict[str, Any]:
    """How prompts rendered with ``template`` are encoded: the options of :func:`encode_pairs` for them.

    The one rule for both packages: ``srdata score`` encodes every row (and the unconditional
    prompt) with it, the teacher pass through the same shard encoding, and ``srd-distill``
    encodes its training rows with it, so training sees the ids that were scored. A chat
    template writes its own special tokens (``add_special_tokens=False``) and its own text
    around the user's content, which truncation keeps whole (``keep``, from a ``tokenizer``
    that has a chat template; :func:`srdata.steps.prompts.chat_affixes`). Every other template
    gets the tokenizer's special tokens (BOS) and may be cut anywhere.

    Example:
        >>> prompt_encoding("alpaca")
        {'max_prompt_tokens': 256, 'truncation_side': 'left', 'add_special_tokens': True, 'keep': ('', '')}
        >>> prompt_encoding("chat", max_prompt_tokens=64)["add_special_tokens"]
        False
    """
    chat = template == "chat"  # chat templates write their own special tokens
    keep = chat_affixes(tokenizer) if chat and getattr(tokenizer, "chat_template", None) else ("", "")  # never cut the turn markers
    return dict(max_prompt_tokens=max_prompt_tokens, truncation_side=truncation_side, add_special_tokens=not chat, keep=keep)


def prompt_lengths(tokenizer: Any, prompts: Sequence[str], template: str | None) -> list[int]:
    """Tokens each prompt rendered with ``template`` takes before any cut (the special tokens its encoding adds included).

    Example:
        >>> prompt_lengths(tok, ["hello world"], "raw")   # doctest: +SKIP
        [3]
    """
    return full_lengths(tokenizer, prompts, add_special_tokens=prompt_encoding(template)["add_special_tokens"])


def _special_affixes(tokenizer: Any, with_specials: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """Split the special tokens the tokenizer adds into a prefix (BOS) and a suffix."""
    n = len(plain)
    for start in range(len(with_specials) - n + 1):
        if with_specials[start : start + n] == plain:
            return with_specials[:start], with_specials[start + n :]
    # The tokenizer's post-processor changed the text tokens themselves; treat every
    # extra token as a prefix so truncation never cuts into them.
    return with_specials[: len(with_specials) - n], []


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_prompt_tokens: int = 256,
    max_reference_tokens: int | None = 256,
    truncation_side: TruncationSide = "left",
    add_special_tokens: bool = True,
    keep: tuple[str, str] = ("", ""),
) -> list[EncodedPair]:
    """Encode prompt/reference pairs by the rules above (batched through the fast tokenizer).

    Example:
        >>> pairs = encode_pairs(tok, ["### Instruction:\\nSay hi\\n\\n### Response:\\n"], ["hi"])  # doctest: +SKIP
        >>> pairs[0].reference_ids[-1] == tok.eos_token_id                                       # doctest: +SKIP
        True
    """
    if len(prompts) != len(references):
        raise ValueError(f"got {len(prompts)} prompts but {len(references)} references")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if max_reference_tokens is not None and max_reference_tokens < 1:
        raise ValueError(f"max_reference_tokens must be >= 1 or None, got {max_reference_tokens}")
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    eos_id = resolve_eos_id(tokenizer)
    prompts, references = list(prompts), list(references)
    if not prompts:
        return []

    plain_prompts = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if add_special_tokens:
        full_prompts = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    else:
        full_prompts = plain_prompts
    plain_refs = tokenizer(references, add_special_tokens=False)["input_ids"]

    encoded = []
    for text, full, plain, ref in zip(prompts, full_prompts, plain_prompts, plain_refs):
        prompt_ids, prompt_truncated = list(full), False
        if len(full) > max_prompt_tokens:
            prefix, suffix = _special_affixes(tokenizer, list(full), list(plain))
            head, body, tail = _split_kept(tokenizer, text, keep, plain)
            budget = max_prompt_tokens - len(prefix) - len(suffix) - len(head) - len(tail)
            if budget < 1:
                raise ValueError(
                    f"max_prompt_tokens={max_prompt_tokens} leaves no room for text next to the "
                    f"{len(prefix) + len(suffix)} special tokens the tokenizer adds and the "
                    f"{len(head) + len(tail)} tokens of the chat template's own text; raise --max-prompt-tokens"
                )
            body = body[-budget:] if truncation_side == "left" else body[:budget]
            prompt_ids, prompt_truncated = prefix + head + list(body) + tail + suffix, True
        reference_ids = list(ref) + [eos_id]
        reference_truncated = max_reference_tokens is not None and len(reference_ids) > max_reference_tokens
        if reference_truncated:
            reference_ids = reference_ids[:max_reference_tokens]
        encoded.append(EncodedPair(prompt_ids, reference_ids, prompt_truncated, reference_truncated))
    return encoded


def _split_kept(tokenizer: Any, text: str, keep: tuple[str, str], plain: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the kept head, the cuttable body and the kept tail of one prompt.

    Each part is tokenized on its own (a chat template's text ends and starts at special
    tokens or newlines, so this matches the whole-string tokenization in practice). A
    prompt that does not start (end) with the kept head (tail) keeps nothing there.
    """
    head_text, tail_text = keep
    head_text = head_text if head_text and text.startswith(head_text) else ""
    tail_text = tail_text if tail_text and text.endswith(tail_text) and len(text) >= len(head_text) + len(tail_text) else ""
    if not head_text and not tail_text:
        return [], list(plain), []
    body_text = text[len(head_text) : len(text) - len(tail_text)]
    head, body, tail = (tokenizer(part, add_special_tokens=False)["input_ids"] if part else [] for part in (head_text, body_text, tail_text))
    return list(head), list(body), list(tail)


def unconditional_prompt_ids(tokenizer: Any, prompt: str, **options: Any) -> list[int]:
    """Token ids of the unconditional prompt (:func:`srdata.steps.prompts.unconditional_prompt`).

    Encoded by the same rules, with the same options, as every row's prompt
    (:func:`encode_pairs`). A prompt that encodes to no token at all (``--template raw``
    with a tokenizer that adds no BOS) gets one token of context, the BOS token, or the
    end-of-sequence token where there is no BOS (GPT-2 style models separate documents
    with it): the first reference token cannot be scored without a context.

    Example:
        >>> unconditional_prompt_ids(gpt2_tokenizer, "")  # doctest: +SKIP
        [50256]
    """
    ids = encode_pairs(tokenizer, [prompt], [""], max_reference_tokens=None, **options)[0].prompt_ids
    if ids:
        return ids
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos) if bos is not None else resolve_eos_id(tokenizer)]


def full_lengths(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool = True, eos: bool = False) -> list[int]:
    """Tokens each text takes before any cut: a prompt (with the special tokens its encoding adds),
    or with ``eos`` a reference (its end-of-sequence id included). What a cut setting must reach.

    Example:
        >>> full_lengths(tok, ["hello world"], add_special_tokens=False)   # doctest: +SKIP
        [2]
    """
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    return [len(i) + int(eos) for i in ids]


def describe_cuts(
    what: str, lengths: Sequence[int], limit: int | None, setting: str, total: int | None = None, sampled: bool = False
) -> str | None:
    """One warning line for the texts longer than ``limit`` (``None`` when none is), naming the value that keeps them all.

    Example:
        >>> describe_cuts("prompts", [300, 100, 612, 50], 256, "--max-prompt-tokens")
        '2 of 4 prompts (50%) are longer than --max-prompt-tokens 256 and are cut; --max-prompt-tokens 612 keeps them all'
    """
    cut = [n for n in lengths if limit is not None and n > limit]
    if not cut:
        return None
    n = total if total is not None else len(lengths)
    scope = f"of {n} sampled rows, {len(cut)}" if sampled else f"{len(cut)} of {n}"
    return f"{scope} {what} ({len(cut) / max(n, 1):.0%}) are longer than {setting} {limit} and are cut; {setting} {max(cut)} keeps them all"
