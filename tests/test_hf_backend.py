"""The transformers backend against plain single-example transformers calls."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srdata.backends import GenerationParams
from srdata.backends.hf import HFBackend
from srdata.tokenize import encode_pairs

PROMPTS = [
    "Below is an instruction that describes a task.\n\n### Instruction:\nName a fruit.\n\n### Response:\n",
    "Translate: hello",
    "x",
    "A much longer prompt that goes on and on about nothing in particular, " * 4,
    "你好世界 😀",
]
REFERENCES = ["An apple.", "bonjour", "", "ok " * 30, "مرحبا"]


def reference_ce(model, prompt_ids, reference_ids) -> float:
    """Plain single-example forward pass: mean NLL over the reference tokens."""
    ids = torch.tensor([prompt_ids + reference_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(prompt_ids) - 1
    picked = logprobs[start : start + len(reference_ids)].gather(1, torch.tensor(reference_ids)[:, None])
    return float(-picked.mean())


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_llama_no_pad"])
def test_ce_and_greedy_match_single_example_transformers(request, fixture):
    path = request.getfixturevalue(fixture)
    # A small token budget forces several length buckets and padding inside them.
    backend = HFBackend.from_pretrained(path, device="cpu", dtype="float32", batch_size=3, token_budget=120)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    pairs = encode_pairs(tok, PROMPTS, REFERENCES)

    losses = backend.score([p.prompt_ids for p in pairs], [p.reference_ids for p in pairs])
    for pair, loss in zip(pairs, losses):
        assert loss == pytest.approx(reference_ce(model, pair.prompt_ids, pair.reference_ids), rel=1e-3)

    params = GenerationParams(max_new_tokens=12, stop_token_ids=(tok.eos_token_id,))
    generations = backend.generate([p.prompt_ids for p in pairs], params)
    for pair, generation in zip(pairs, generations):
        expected = model.generate(
            torch.tensor([pair.prompt_ids]), max_new_tokens=12, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        )[0, len(pair.prompt_ids):].tolist()
        stopped = tok.eos_token_id in expected
        expected = expected[: expected.index(tok.eos_token_id)] if stopped else expected
        assert generation.token_ids == expected
        assert generation.finish_reason == ("stop" if stopped else "length")
        assert generation.text == tok.decode(expected, skip_special_tokens=True)


def test_hidden_state_path_is_used_for_plain_architectures(tiny_gpt2):
    assert HFBackend.from_pretrained(tiny_gpt2, device="cpu").hidden_state_ce


def test_stop_token_ends_generation(tiny_gpt2):
    backend = HFBackend.from_pretrained(tiny_gpt2, device="cpu")
    tok = backend.tokenizer
    prompt = tok("hello", add_special_tokens=False)["input_ids"]
    first = backend.generate([prompt], GenerationParams(max_new_tokens=1))[0].token_ids[0]
    # Declaring the token the model will produce first as the stop token ends at once.
    stopped = backend.generate([prompt], GenerationParams(max_new_tokens=5, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [] and stopped.finish_reason == "stop"


def test_bad_arguments_are_refused(tiny_gpt2):
    backend = HFBackend.from_pretrained(tiny_gpt2, device="cpu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.generate([[1, 2]], GenerationParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="no tokens"):
        backend.score([[1, 2]], [[]])
