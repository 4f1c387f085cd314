"""`srdata score` with a real pretrained student (SmolLM2-135M-Instruct) on real text.

Every number is checked against an independent plain transformers computation written
here: one unpadded forward pass per row (log-softmax, mean NLL over the reference
positions, end-of-sequence included) and one unpadded greedy ``model.generate`` per row.
The token ids are rebuilt from the run's ``prompt_text`` and reference with the
tokenizer alone (``add_special_tokens=False`` for chat prompts, reference + EOS), so the
reference does not go through srdata's own code.

Two scoring runs, each through the CLI (``srdata score ... -q``):

* SelfInst rows with ``--template chat``: cross-entropy and greedy answers, ChatML
  end-of-turn handling (``<|im_end|>`` is the EOS that is scored and that stops
  generation; no special token leaks into ``student_output``).
* T0 rows of a few templates (short to very long prompts, empty and long responses) with
  ``--max-prompt-tokens 128 --max-reference-tokens 12``: truncation keeps the chat
  template's own text (system turn, user header, end of turn, assistant header) and cuts
  the start of the user's content; references are cut without their EOS, and the
  scores equal the plain computation on the truncated ids.

The runs also record warnings: a run must emit no deprecation warning from transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from srdata.cli import main

from ._warnings import deprecation_notices
from .conftest import write_jsonl
from ._threads import single_torch_thread

MAX_NEW_TOKENS = 16
T0_MAX_PROMPT_TOKENS = 128
T0_MAX_REFERENCE_TOKENS = 12
CE_RTOL = 1e-4
# T0 templates: short closed-book QA, empty responses (trec), pairs, long reviews, news
# articles with long summaries, and multi-thousand-token wiki_hop prompts.
T0_TEMPLATES = {
    "sciq_Direct_Question_Closed_Book_": 2,
    "trec_trec1": 1,
    "glue_qqp_duplicate": 1,
    "imdb_Reviewer_Sentiment_Feeling": 2,
    "cnn_dailymail_3_0_0_news_summary": 2,
    "wiki_hop_original_generate_subject": 1,
    "common_gen_topic_to_sentence": 1,
}
SPECIAL_TEXT = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
CHAT_HEAD = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
ASSISTANT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"  # end of the user turn + the assistant header
ASSISTANT_HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's forward passes on one intra-op thread.

    On a 2-core machine that other processes share, two OpenMP threads stall at every
    barrier whenever one of them is descheduled: this file took 255-280 s with two threads
    and 57-60 s with one, back to back under a load of 2-4. srdata and the plain reference
    both run under this setting.
    """
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def plain(smollm2):
    """The independent reference: the student loaded by plain transformers, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, tokenizer


def run_cli(data: Path, model: Path, out: Path, *extra: str) -> tuple[pl.DataFrame, dict, list[str]]:
    """One ``srdata score`` run; returns the annotated rows, the manifest and the deprecation
    notices transformers gave during the run."""
    args = [
        "score", str(data), "--model", str(model), "--output", str(out), "--backend", "hf", "--device", "cpu",
        "--dtype", "float32", "--template", "chat", "--max-new-tokens", str(MAX_NEW_TOKENS), "-q", *extra,
    ]
    with deprecation_notices() as notices:
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    frame = pl.read_parquet(out / "annotated.parquet").sort("srd_id")
    manifest = json.loads((out / "manifest.json").read_text())
    return frame, manifest, notices


@pytest.fixture(scope="module")
def selfinst_rows(shared_data_dir) -> list[dict]:
    """10 SelfInst tasks (instruction + first instance), short enough to keep the file fast."""
    rows = []
    for line in (shared_data_dir / "selfinst-252.jsonl").read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        instance = task["instances"][0]
        if len(instance["output"]) <= 120 and len(task["instruction"]) + len(instance["input"]) <= 400:
            rows.append({"instruction": task["instruction"], "input": instance["input"], "output": instance["output"]})
    assert len(rows) >= 10
    return rows[:10]


@pytest.fixture(scope="module")
def selfinst_run(smollm2, selfinst_rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("selfinst")
    data = write_jsonl(folder / "selfinst.jsonl", selfinst_rows)
    return run_cli(data, smollm2, folder / "run")


@pytest.fixture(scope="module")
def t0_rows(shared_data_dir) -> pl.DataFrame:
    t0 = pl.read_parquet(shared_data_dir / "t0-train.parquet")
    parts = [t0.filter(pl.col("template") == name).head(n) for name, n in T0_TEMPLATES.items()]
    rows = pl.concat(parts)
    assert rows.height == sum(T0_TEMPLATES.values())
    return rows


@pytest.fixture(scope="module")
def t0_run(smollm2, t0_rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t0")
    data = folder / "t0.parquet"
    t0_rows.write_parquet(data)
    return run_cli(
        data, smollm2, folder / "run",
        "--max-prompt-tokens", str(T0_MAX_PROMPT_TOKENS), "--max-reference-tokens", str(T0_MAX_REFERENCE_TOKENS),
    )


# ------------------------------------------------------------------ plain reference
def plain_ids(tokenizer, prompt_text: str, reference: str) -> tuple[list[int], list[int]]:
    """Chat prompt ids (its special tokens are in the text) and reference ids + EOS, untruncated."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    reference_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, reference_ids


@torch.no_grad()
def plain_ce(model, prompt_ids: list[int], reference_ids: list[int]) -> float:
    """Unpadded forward pass on prompt + reference: mean NLL of the reference tokens."""
    logits = model(torch.tensor([prompt_ids + reference_ids])).logits[0]
    start = len(prompt_ids) - 1  # the output at position t predicts token t + 1
    logprobs = torch.log_softmax(logits[start : start + len(reference_ids)].double(), dim=-1)
    return float(-logprobs.gather(1, torch.tensor(reference_ids)[:, None]).mean())


@torch.no_grad()
def plain_greedy(model, tokenizer, prompt_ids: list[int]) -> tuple[list[int], bool]:
    """Unpadded greedy generate for one row: the ids before the first EOS, and whether it stopped."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )[0, len(prompt_ids) :].tolist()
    stopped = tokenizer.eos_token_id in out
    return (out[: out.index(tokenizer.eos_token_id)] if stopped else out), stopped


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_greedy(frame: pl.DataFrame, model, tokenizer, prompts: list[list[int]]) -> None:
    """The run's greedy answers equal the plain ones (text, length, finish reason) on >= 99% of rows."""
    mismatches = []
    for row, prompt in zip(frame.iter_rows(named=True), prompts):
        expected, stopped = plain_greedy(model, tokenizer, prompt)
        same = (
            row["student_output"] == tokenizer.decode(expected, skip_special_tokens=True)
            and row["output_tokens"] == len(expected)
            and row["finish_reason"] == ("stop" if stopped else "length")
        )
        if not same:
            mismatches.append((row["srd_id"], row["student_output"], tokenizer.decode(expected)))
    assert len(mismatches) <= 0.01 * frame.height, mismatches


# ------------------------------------------------------------------ SelfInst, chat template
def test_selfinst_chat_ce_and_greedy_match_plain_transformers(selfinst_run, selfinst_rows, plain):
    frame, manifest, _ = selfinst_run
    model, tokenizer = plain
    assert frame.height == len(selfinst_rows) and manifest["counts"]["rows_scored"] == len(selfinst_rows)
    assert manifest["config"]["prompt"]["template"] == "chat" and manifest["backend"] == "hf"

    prompts = []
    for row, source in zip(frame.iter_rows(named=True), selfinst_rows):
        content = source["instruction"] + (f"\n\n{source['input']}" if source["input"].strip() else "")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        assert row["prompt_text"] == rendered
        assert row["reference_text"] == source["output"]
        prompt, reference = plain_ids(tokenizer, row["prompt_text"], row["reference_text"])
        assert row["prompt_tokens"] == len(prompt) and not row["prompt_truncated"]
        assert row["reference_tokens"] == len(reference) and not row["reference_truncated"]
        expected = plain_ce(model, prompt, reference)
        assert relative_difference(row["ce_loss"], expected) <= CE_RTOL, (row["srd_id"], row["ce_loss"], expected)
        prompts.append(prompt)
    check_greedy(frame, model, tokenizer, prompts)
    assert frame["rouge_l"].is_between(0, 1).all() and frame["ce_loss"].is_finite().all()
    assert sorted(frame["difficulty_rank"].to_list()) == list(range(1, frame.height + 1))


def test_chatml_end_of_turn_is_scored_and_stops_generation(selfinst_run, plain):
    frame, _, _ = selfinst_run
    model, tokenizer = plain
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end

    for row in frame.iter_rows(named=True):
        prompt, reference = plain_ids(tokenizer, row["prompt_text"], row["reference_text"])
        # The scored reference ends with the end of the assistant's turn, and nothing follows it.
        assert reference[-1] == im_end and im_end not in reference[:-1]
        assert row["prompt_text"].endswith(ASSISTANT_HEADER)
        # The answer is the assistant's turn only: no ChatML markup survives in it.
        for special in SPECIAL_TEXT:
            assert special not in row["student_output"], (row["srd_id"], row["student_output"])
    stopped = frame.filter(pl.col("finish_reason") == "stop")
    assert stopped.height >= 1, "some SelfInst answers should end within the token limit"
    assert (stopped["output_tokens"] < MAX_NEW_TOKENS).all()
    # Rows that ran to the limit used every token; rows that stopped did so at <|im_end|>.
    assert (frame.filter(pl.col("finish_reason") == "length")["output_tokens"] == MAX_NEW_TOKENS).all()
    for row in stopped.head(2).iter_rows(named=True):
        # Plain greedy decoding picks <|im_end|> right after the same number of tokens.
        prompt, _ = plain_ids(tokenizer, row["prompt_text"], row["reference_text"])
        answer, ended = plain_greedy(model, tokenizer, prompt)
        assert ended and len(answer) == row["output_tokens"]


# ------------------------------------------------------------------ T0, truncation
def test_t0_truncation_keeps_the_assistant_header_and_scores_the_cut_ids(t0_run, t0_rows, plain):
    frame, manifest, _ = t0_run
    model, tokenizer = plain
    assert frame.height == t0_rows.height
    assert frame["template"].to_list() == t0_rows["template"].to_list()  # original columns kept, in order
    header = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
    prompts, n_prompt_cut, n_reference_cut = [], 0, 0
    for row in frame.iter_rows(named=True):
        assert row["prompt_text"].endswith(ASSISTANT_HEADER)
        full_prompt, full_reference = plain_ids(tokenizer, row["prompt_text"], row["reference_text"])

        assert row["prompt_truncated"] == (len(full_prompt) > T0_MAX_PROMPT_TOKENS)
        assert row["prompt_tokens"] == min(len(full_prompt), T0_MAX_PROMPT_TOKENS) <= T0_MAX_PROMPT_TOKENS
        prompt = full_prompt
        if row["prompt_truncated"]:
            # the template's own text stays whole; left truncation cuts the start of the user's content
            n_prompt_cut += 1
            assert row["prompt_text"].startswith(CHAT_HEAD)
            head, tail = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (CHAT_HEAD, ASSISTANT_TAIL))
            content = tokenizer(row["prompt_text"][len(CHAT_HEAD) : -len(ASSISTANT_TAIL)], add_special_tokens=False)["input_ids"]
            prompt = head + content[-(T0_MAX_PROMPT_TOKENS - len(head) - len(tail)) :] + tail
        assert len(prompt) == row["prompt_tokens"]
        assert prompt[-len(header) :] == header
        assert tokenizer.decode(prompt).startswith("<|im_start|>system\n") and tokenizer.decode(prompt).endswith(ASSISTANT_HEADER)

        reference = full_reference[:T0_MAX_REFERENCE_TOKENS]
        assert row["reference_truncated"] == (len(full_reference) > T0_MAX_REFERENCE_TOKENS)
        assert row["reference_tokens"] == len(reference)
        if row["reference_truncated"]:
            n_reference_cut += 1
            assert tokenizer.eos_token_id not in reference  # a cut reference loses its EOS
        else:
            assert reference[-1] == tokenizer.eos_token_id
        if row["reference_text"] == "":  # trec: scored on the EOS alone
            assert row["reference_tokens"] == 1 and row["rouge_l"] == 0.0

        expected = plain_ce(model, prompt, reference)
        assert relative_difference(row["ce_loss"], expected) <= CE_RTOL, (row["srd_id"], row["ce_loss"], expected)
        prompts.append(prompt)

    # The selection covers both sides of each limit.
    assert 0 < n_prompt_cut < frame.height and 0 < n_reference_cut < frame.height
    assert manifest["counts"]["prompts_truncated"] == n_prompt_cut
    assert manifest["counts"]["references_truncated"] == n_reference_cut
    assert frame["reference_text"].str.len_chars().min() == 0  # the empty trec response is in
    check_greedy(frame, model, tokenizer, prompts)
    for special in SPECIAL_TEXT:
        assert not frame["student_output"].str.contains(special, literal=True).any()


# ------------------------------------------------------------------ warnings
@pytest.mark.parametrize("run", ["selfinst_run", "t0_run"])
def test_runs_get_no_deprecation_notice_from_transformers(request, run):
    _, _, notices = request.getfixturevalue(run)
    assert not notices, notices
