"""One encoding rule for both packages (issue 26): srd-distill trains on exactly the ids srdata scored.

``srdata score`` runs for real on a chat model; the ids its backend receives are recorded
as they pass (the real backend scores them). ``srd-distill``'s data reading then encodes the
run's ``annotated.parquet`` with the settings it finds in the manifest, and must produce the
same prompt and reference ids, row by row, truncated chat prompts included.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from transformers import AutoTokenizer

import srdata
import srdata.shard
from srdata.run.folder import read_manifest
from tests.conftest import write_jsonl

#: ChatML with BOS written by the template itself: a BOS added again by the tokenizer, or a turn
#: marker cut by truncation, would change the ids.
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(params=["tiny_llama", "smollm2"])
def chat_model(request, tmp_path) -> Path:
    """A chat model: the tiny llama given a ChatML template (its tokenizer adds BOS), or the real SmolLM2 (skips when absent)."""
    source = request.getfixturevalue(request.param)
    if request.param == "smollm2":
        return source
    model = tmp_path / "chat-llama"
    shutil.copytree(source, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(model)
    return model


def test_training_ids_are_the_scored_ids(chat_model, tmp_path, monkeypatch):
    from srd_distill.data import encode_file, find_encoding_settings

    scored: list[tuple[list[int], list[int]]] = []
    load_backend = srdata.shard.load_backend

    def recording_backend(config, tokenizer=None):
        """The real backend; the ids it is asked to score are written down on their way in."""
        backend = load_backend(config, tokenizer=tokenizer)
        score_and_generate = backend.score_and_generate

        def record(prompts, references, params, on_progress=None):
            scored.extend((list(p), list(r)) for p, r in zip(prompts, references))
            return score_and_generate(prompts, references, params, on_progress)

        backend.score_and_generate = record
        return backend

    monkeypatch.setattr(srdata.shard, "load_backend", recording_backend)
    rows = [{"instruction": f"Repeat after me, word by word: {'very ' * (4 * i)}number {i}.", "output": f"number {i}"} for i in range(6)]
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    lengths = sorted(len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                                                   add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                     for r in rows)
    run = tmp_path / "run"
    srdata.score(dataset=str(write_jsonl(tmp_path / "d.jsonl", rows)), model=str(chat_model), output=str(run), progress=False,
                 device="cpu", dtype="float32", max_new_tokens=2, max_prompt_tokens=lengths[len(lengths) // 2], shard_size=100)
    annotated = pl.read_parquet(run / "annotated.parquet").sort("srd_id")
    assert read_manifest(run).template == "chat"
    assert annotated["prompt_truncated"].any() and not annotated["prompt_truncated"].all()  # the kept-whole turn markers matter
    assert len(scored) == annotated.height

    encoding = find_encoding_settings(run / "annotated.parquet")
    assert encoding.template == "chat" and encoding.add_special_tokens is False
    data, flagged = encode_file(run / "annotated.parquet", tokenizer, encoding, max_length=4096)
    assert flagged == 0
    assert data.prompt_ids == [prompt for prompt, _ in scored]
    assert [e.input_ids for e in data.examples] == [prompt + reference for prompt, reference in scored]
    assert [len(p) for p, _ in scored] == annotated["prompt_tokens"].to_list()
