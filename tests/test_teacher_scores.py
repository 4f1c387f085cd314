"""Top-K teacher scores (``Backend.score_top_k``) against a plain single-example transformers forward pass."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srdata.backends.hf import HFBackend
from srdata.steps.tokenize import encode_pairs

from .test_hf_backend import PROMPTS, REFERENCES


def plain_logprobs(model, prompt_ids, reference_ids) -> torch.Tensor:
    """log p(. | prefix) at every position that predicts a reference token, float64: (reference tokens, vocab)."""
    ids = torch.tensor([prompt_ids + reference_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(prompt_ids) - 1
    return logprobs[start : start + len(reference_ids)]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("top_k", [0, 5, "vocab"])
def test_top_k_and_nll_equal_a_plain_forward_pass(request, fixture, top_k):
    path = request.getfixturevalue(fixture)
    backend = HFBackend.from_pretrained(path, device="cpu", dtype="float32", batch_size=3, token_budget=120)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    k = vocab if top_k == "vocab" else top_k
    pairs = encode_pairs(tok, PROMPTS, REFERENCES)
    prompts, references = [p.prompt_ids for p in pairs], [p.reference_ids for p in pairs]

    results = backend.score_top_k(prompts, references, k)
    assert len(results) == len(pairs)
    for prompt, reference, got in zip(prompts, references, results):
        expected = plain_logprobs(model, prompt, reference)
        nll = -expected.gather(1, torch.tensor(reference)[:, None]).mean().item()
        assert got.nll == pytest.approx(nll, rel=1e-5, abs=1e-6)
        if k == 0:
            assert got.top_ids is None and got.top_logprobs is None
            continue
        assert got.top_ids.shape == got.top_logprobs.shape == (len(reference), k)
        assert got.top_ids.dtype == np.int32 and got.top_logprobs.dtype == np.float32
        # the values are the K largest log-probs, highest first ...
        best = expected.topk(k, dim=-1).values.numpy()
        np.testing.assert_allclose(got.top_logprobs, best, rtol=1e-5, atol=1e-5)
        # ... and each id carries its own log-prob (ties may order ids differently)
        at_ids = expected.gather(1, torch.from_numpy(got.top_ids.astype(np.int64))).numpy()
        np.testing.assert_allclose(got.top_logprobs, at_ids, rtol=1e-5, atol=1e-5)
        assert all(len(set(row)) == k for row in got.top_ids.tolist())
        if k == vocab:  # the whole distribution: it sums to one
            np.testing.assert_allclose(np.exp(got.top_logprobs.astype(np.float64)).sum(-1), 1.0, rtol=1e-5)


def test_score_is_the_nll_of_score_top_k(tiny_llama):
    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = encode_pairs(tok, PROMPTS, REFERENCES)
    prompts, references = [p.prompt_ids for p in pairs], [p.reference_ids for p in pairs]
    assert backend.score(prompts, references) == [r.nll for r in backend.score_top_k(prompts, references, 3)]


def test_bad_top_k_is_refused(tiny_llama):
    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="top_k must be between 0 and the vocabulary size"):
        backend.score_top_k([[1, 2]], [[3]], 10**7)
