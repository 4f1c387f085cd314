"""HF's answers as the reference the vLLM backend and engines are compared with (tests/test_vllm_*.py).

Example:
    >>> ref = hf_reference(model_path, ["Say hi."], ["Hi."], batch_size=4)   # doctest: +SKIP
    >>> ref.hf.score(ref.prompts, ref.references)                             # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence


def hf_reference(path: Path, prompts: Sequence[str], references: Sequence[str], **options: Any) -> SimpleNamespace:
    """``SimpleNamespace(path, hf, prompts, references, eos)``: HF's float32 CPU backend on ``path`` and the pairs
    encoded with its tokenizer. ``options``: ``HFBackend`` options (``batch_size``, ``token_budget``) and
    ``encode_pairs`` limits (``max_prompt_tokens``, ``max_reference_tokens``). The fixtures add their answers to it."""
    from srdata.backends.hf import HFBackend
    from srdata.steps.tokenize import encode_pairs

    limits = {k: options.pop(k) for k in ("max_prompt_tokens", "max_reference_tokens") if k in options}
    hf = HFBackend.from_pretrained(path, device="cpu", dtype="float32", **options)
    pairs = encode_pairs(hf.tokenizer, list(prompts), list(references), **limits)
    return SimpleNamespace(path=path, hf=hf, prompts=[p.prompt_ids for p in pairs], references=[p.reference_ids for p in pairs],
                           eos=hf.tokenizer.eos_token_id)
