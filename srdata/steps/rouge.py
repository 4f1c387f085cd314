"""ROUGE-L F-measure, bit-identical to Google's ``rouge-score`` and ~100x faster.

Why this module exists
----------------------
SRD ranks training examples by the ROUGE-L F-measure between a student's answer and
the reference answer. The reference number everyone reports comes from Google's
``rouge-score`` package::

    RougeScorer(["rougeL"], use_stemmer=True).score(target=ref, prediction=pred)["rougeL"].fmeasure

That implementation is pure Python (an O(n*m) list-of-lists LCS table, an uncached
Porter stemmer, two regex passes per text) and is far too slow for scoring hundreds
of thousands of pairs. :func:`rouge_l` returns *exactly* the same floats (same
tokens, same LCS length, same float operations in the same order) while:

* tokenising with a single byte-level ``translate`` + ``split`` (ASCII lower-casing
  and "non-[a-z0-9] to space" in one C pass) instead of two regex passes;
* caching the Porter stem of every distinct token (stemming dominates the cost of
  ``rouge-score``) and mapping each stem to a small integer id;
* computing the LCS length with ``rapidfuzz.distance.LCSseq.similarity`` (bit-parallel
  C++) on the integer sequences. Integer ids (rather than strings) are both faster
  and collision-free: rapidfuzz compares sequence elements by hash.

``tokenizer="unicode"`` is an opt-in, documented deviation that also scores
non-Latin text, which ``rouge-score`` silently scores 0 (see :func:`rouge_l`).
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
import threading
import unicodedata
from typing import Callable, Literal, Sequence

from rapidfuzz.distance import LCSseq

__all__ = ["rouge_l", "TOKENIZERS"]

#: Valid values of the ``tokenizer`` argument of :func:`rouge_l`.
TOKENIZERS: tuple[str, ...] = ("default", "unicode")

# --------------------------------------------------------------------------- #
# Stemming (lazy: importing nltk costs ~1 s, so it happens on the first miss)  #
# --------------------------------------------------------------------------- #


@functools.cache
def _stem_function() -> Callable[[str], str]:
    """The same stemmer ``rouge-score`` builds: ``nltk`` Porter, NLTK_EXTENSIONS mode."""
    from nltk.stem import porter

    return porter.PorterStemmer().stem


# rouge_score.tokenize.VALID_TOKEN_RE, applied to tokens after stemming.
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$").match

# Token caches are dropped (not trimmed) once they hold this many distinct tokens,
# which bounds memory on adversarial input (e.g. millions of distinct numbers).
_MAX_CACHED_TOKENS = 500_000

# Id of a token that is dropped after stemming (never seen in practice: the
# Porter stemmer maps [a-z0-9]{4,} to a non-empty [a-z0-9]+ string).
_DROP = -1


class _Vocab:
    """Token -> stem-id caches shared by all calls until they grow too large.

    ``ascii`` is keyed by ``bytes`` tokens (the fast default path), ``text`` by ``str``
    tokens (the Unicode path); both map through the same ``form -> id`` table, so a
    prediction tokenised one way and a reference tokenised the other agree on ids.
    A call keeps a reference to one ``_Vocab`` for each pair it scores, so replacing
    the global one (when full) never mixes ids from two tables within a pair, even
    across threads. Ids come from a process-wide counter and are never reused.
    """

    __slots__ = ("form_ids", "ascii", "text", "has_drops")

    def __init__(self) -> None:
        self.form_ids: dict[str, int] = {}
        self.ascii = _AsciiTokenIds(self)
        self.text = _TextTokenIds(self)
        self.has_drops = False

    def size(self) -> int:
        return len(self.ascii) + len(self.text)

    def form_id(self, token: str) -> int:
        """Id of ``token`` after ``rouge-score``'s stemming rule and validity filter."""
        form = _stem_function()(token) if len(token) > 3 else token
        if not _VALID_TOKEN(form):
            self.has_drops = True
            return _DROP
        ids = self.form_ids
        found = ids.get(form)
        if found is None:
            found = ids.setdefault(form, next(_ID_COUNTER))
        return found


class _AsciiTokenIds(dict):
    """``bytes`` token (``[a-z0-9]+``) -> id; misses are stemmed once."""

    __slots__ = ("vocab",)

    def __init__(self, vocab: _Vocab) -> None:
        super().__init__()
        self.vocab = vocab

    def __missing__(self, token: bytes) -> int:
        token_id = self.vocab.form_id(token.decode("ascii"))
        self[token] = token_id
        return token_id


class _TextTokenIds(dict):
    """``str`` token from the Unicode tokenizer -> id.

    ASCII tokens get the default rule (Porter stem when longer than 3 characters);
    tokens with any non-ASCII character are used as they are.
    """

    __slots__ = ("vocab",)

    def __init__(self, vocab: _Vocab) -> None:
        super().__init__()
        self.vocab = vocab

    def __missing__(self, token: str) -> int:
        vocab = self.vocab
        if token.isascii():
            token_id = vocab.form_id(token)
        else:
            ids = vocab.form_ids
            token_id = ids.get(token)
            if token_id is None:
                token_id = ids.setdefault(token, next(_ID_COUNTER))
        self[token] = token_id
        return token_id


_ID_COUNTER = itertools.count()
_VOCAB_LOCK = threading.Lock()
_VOCAB = _Vocab()


def _current_vocab() -> _Vocab:
    return _VOCAB


def _fresh_vocab(stale: _Vocab | None = None) -> _Vocab:
    """Replace the global caches (if ``stale`` is still current) and return the new ones."""
    global _VOCAB
    with _VOCAB_LOCK:
        if stale is None or _VOCAB is stale:
            _VOCAB = _Vocab()
        return _VOCAB


def _reset_caches() -> None:
    """Drop all cached stems (used by benchmarks to time a cold cache)."""
    _fresh_vocab()


# --------------------------------------------------------------------------- #
# Default tokenizer: exactly rouge_score.tokenize.tokenize(text, PorterStemmer) #
# --------------------------------------------------------------------------- #

# One byte-translation does rouge-score's "lower()" (for ASCII) and its
# "[^a-z0-9]+ -> space" substitution; bytes.split() then does its "\s+" split and
# drops the empty strings that its validity filter would drop.
_ASCII_TABLE = bytes(
    (c | 0x20) if (0x41 <= c <= 0x5A) else c if (0x30 <= c <= 0x39 or 0x61 <= c <= 0x7A) else 0x20
    for c in range(256)
)


def _ascii_tokens(text: str) -> list[bytes]:
    """Maximal ``[a-z0-9]+`` runs of ``text.lower()``, as ``bytes``.

    ``text.lower()`` is applied to non-ASCII text first because Unicode lower-casing
    can yield ASCII letters (KELVIN SIGN -> ``k``, ``İ`` -> ``i`` + combining dot);
    every remaining non-ASCII character then becomes ``?``, i.e. a separator.
    """
    if text.isascii():
        data = text.encode("ascii")
    else:
        data = text.lower().encode("ascii", "replace")
    return data.translate(_ASCII_TABLE).split()


def _ids_default(text: str, vocab: _Vocab) -> list[int]:
    ids = list(map(vocab.ascii.__getitem__, _ascii_tokens(text)))
    if vocab.has_drops and _DROP in ids:
        ids = [i for i in ids if i != _DROP]
    return ids


# --------------------------------------------------------------------------- #
# Unicode tokenizer (opt-in deviation from rouge-score)                        #
# --------------------------------------------------------------------------- #

# Scripts written without spaces between words: each character is one token.
_CJK_RANGES = (
    "\u3005-\u3007"  # 々 〆 〇
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff"  # Katakana
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK unified ideographs extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # Half-width Katakana (NFKC maps these to full width anyway)
    "\U00020000-\U000323af"  # CJK extensions B-H and compatibility supplement
)


@functools.cache
def _unicode_token_finder() -> Callable[[str], list[str]]:
    """Compile the Unicode token regex (built lazily: listing combining marks takes ~0.1 s).

    A token is either one CJK / kana / Hangul-syllable character, or a run of word
    characters of any script (``\\w`` minus ``_``) that may carry combining marks
    (categories Mn/Mc/Me). Marks are not ``\\w`` in Python's ``re``, yet they are part
    of words in Devanagari, Arabic (harakat), Thai, Hebrew (niqqud), decomposed Latin...
    """
    marks: list[str] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == "M":
            if cp != prev + 1:
                if start >= 0:
                    marks.append(_char_range(start, prev))
                start = cp
            prev = cp
    if start >= 0:
        marks.append(_char_range(start, prev))
    mark_class = "".join(marks)
    word = rf"[^\W_{_CJK_RANGES}]"
    # "word (word | mark)*", unrolled so that sre scans character-class runs.
    pattern = rf"[{_CJK_RANGES}][{mark_class}]*|{word}+(?:[{mark_class}]+{word}*)*"
    return re.compile(pattern).findall


def _char_range(first: int, last: int) -> str:
    if first == last:
        return re.escape(chr(first))
    return f"{re.escape(chr(first))}-{re.escape(chr(last))}"


def _normalize_unicode(text: str) -> str:
    """NFKC + case folding (NFKC again after folding, as Unicode's NFKC_Casefold does)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return unicodedata.normalize("NFKC", text)


def _tokens_unicode(text: str) -> list[str]:
    """Tokens of ``text`` under ``tokenizer="unicode"``, before stemming (for tests)."""
    return _unicode_token_finder()(_normalize_unicode(text))


def _ids_unicode(text: str, vocab: _Vocab) -> list[int]:
    if text.isascii():
        # On ASCII text NFKC is the identity, casefold() == lower() and the token
        # regex yields exactly the [a-z0-9]+ runs: the fast default path is exact.
        return _ids_default(text, vocab)
    ids = list(map(vocab.text.__getitem__, _tokens_unicode(text)))
    if vocab.has_drops and _DROP in ids:
        ids = [i for i in ids if i != _DROP]
    return ids


_TOKEN_IDS: dict[str, Callable[[str, _Vocab], list[int]]] = {
    "default": _ids_default,
    "unicode": _ids_unicode,
}


# --------------------------------------------------------------------------- #
# Public API                                                                   #
# --------------------------------------------------------------------------- #


def _as_text_list(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of strings, not a single {type(values).__name__}; "
            f"wrap one text in a list: [{name[:-1]}]"
        )
    if isinstance(values, list):
        return values
    try:
        return list(values)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of strings, got {type(values).__name__}"
        ) from None


def _bad_element(values: list[str], name: str) -> TypeError:
    for index, value in enumerate(values):
        if not isinstance(value, str):
            return TypeError(
                f"{name}[{index}] must be a str, got {type(value).__name__} ({value!r:.60})"
            )
    raise AssertionError("unreachable")  # pragma: no cover


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[str],
    tokenizer: Literal["default", "unicode"] = "default",
) -> list[float]:
    """ROUGE-L F-measure of each ``(prediction, reference)`` pair.

    With ``tokenizer="default"`` the result is bit-identical to Google's
    ``rouge-score`` 0.1.2::

        RougeScorer(["rougeL"], use_stemmer=True).score(
            target=reference, prediction=prediction)["rougeL"].fmeasure

    i.e. lower-case, every character outside ``[a-z0-9]`` is a separator, Porter
    stemming (nltk, NLTK_EXTENSIONS mode) of tokens longer than 3 characters, token
    LCS, ``P = lcs / len(prediction_tokens)``, ``R = lcs / len(reference_tokens)``,
    ``F = 2 * P * R / (P + R)``, and ``0.0`` when either side has no tokens. Like
    ``rouge-score`` it therefore scores text without Latin letters or digits
    (Chinese, Japanese, Arabic, Cyrillic, ...) as 0.

    ``tokenizer="unicode"`` **deviates from rouge-score** (opt in only; do not
    compare its numbers with published ROUGE-L): text is NFKC-normalised and
    case-folded; tokens are runs of word characters of any script (``\\w`` minus
    ``_``, keeping combining marks) and every CJK ideograph, Hiragana, Katakana and
    Hangul syllable is a token of its own; ASCII tokens longer than 3 characters are
    still Porter-stemmed. On pure-ASCII text it returns exactly the default numbers.
    Scripts written without spaces other than CJK (Thai, Lao, Khmer, Burmese) are
    not segmented: a run of such text is a single token.

    Args:
        predictions: model outputs, one ``str`` per pair.
        references: reference texts, one ``str`` per pair (same length).
        tokenizer: ``"default"`` (exact rouge-score parity) or ``"unicode"``.

    Returns:
        One float in ``[0, 1]`` per pair, in input order.

    Raises:
        ValueError: the two sequences differ in length, or ``tokenizer`` is unknown.
        TypeError: an argument is not a sequence, or an element is not a ``str``.

    Example:
        >>> rouge_l(["The cats are running home"], ["a cat runs home"])
        [0.6666666666666665]
        >>> rouge_l(["猫が好きです"], ["猫が好き"])
        [0.0]
        >>> rouge_l(["猫が好きです"], ["猫が好き"], tokenizer="unicode")
        [0.8]
    """
    token_ids = _TOKEN_IDS.get(tokenizer) if isinstance(tokenizer, str) else None
    if token_ids is None:
        raise ValueError(
            f"unknown tokenizer {tokenizer!r}; valid tokenizers: "
            + ", ".join(repr(t) for t in TOKENIZERS)
        )
    preds = _as_text_list(predictions, "predictions")
    refs = _as_text_list(references, "references")
    if len(preds) != len(refs):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(preds)} predictions and {len(refs)} references"
        )

    for values, name in ((preds, "predictions"), (refs, "references")):
        if not all(isinstance(value, str) for value in values):
            raise _bad_element(values, name)

    lcs = LCSseq.similarity
    vocab = _current_vocab()
    scores: list[float] = []
    append = scores.append
    for prediction, reference in zip(preds, refs):
        if vocab.size() > _MAX_CACHED_TOKENS:
            vocab = _fresh_vocab(vocab)
        prediction_ids = token_ids(prediction, vocab)
        reference_ids = token_ids(reference, vocab)
        if not prediction_ids or not reference_ids:
            append(0.0)
            continue
        lcs_length = lcs(prediction_ids, reference_ids)
        # Same operations, same order as rouge_score.rouge_scorer._score_lcs
        # and rouge_score.scoring.fmeasure.
        precision = lcs_length / len(prediction_ids)
        recall = lcs_length / len(reference_ids)
        if precision + recall > 0:
            append(2 * precision * recall / (precision + recall))
        else:
            append(0.0)
    return scores
