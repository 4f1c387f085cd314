"""One prompt/reference pair encoded by srdata's rules: a test's shorthand for :func:`srdata.steps.tokenize.encode_pairs`."""

from __future__ import annotations

from typing import Any

from srdata.steps.tokenize import EncodedPair, encode_pairs


def encode_pair(tokenizer: Any, prompt: str, reference: str, **options: Any) -> EncodedPair:
    """Encode a single pair; see :func:`srdata.steps.tokenize.encode_pairs` for the rules and options."""
    return encode_pairs(tokenizer, [prompt], [reference], **options)[0]
