"""The transformers backend against plain single-example transformers calls."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srdata.backends import GenerationParams
from srdata.backends.hf import HFBackend
from srdata.steps.tokenize import encode_pairs

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


def expected_greedy(model, tok, prompt_ids, max_new_tokens, **options) -> tuple[list[int], bool]:
    """Plain single-example greedy ``generate``: the ids before the first EOS, and whether it stopped."""
    expected = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **options,
    )[0, len(prompt_ids):].tolist()
    stopped = tok.eos_token_id in expected
    return (expected[: expected.index(tok.eos_token_id)] if stopped else expected), stopped


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_llama_no_pad"])
@pytest.mark.parametrize("mode", ["separate", "shared_prefill"])
def test_ce_and_greedy_match_single_example_transformers(request, fixture, mode):
    path = request.getfixturevalue(fixture)
    # A small token budget forces several length buckets and padding inside them.
    # ... and a small prefill chunk splits each batch's prompt prefill into several forwards.
    backend = HFBackend.from_pretrained(
        path, device="cpu", dtype="float32", batch_size=3, token_budget=120, prefill_chunk_tokens=16
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    pairs = encode_pairs(tok, PROMPTS, REFERENCES)
    prompts, references = [p.prompt_ids for p in pairs], [p.reference_ids for p in pairs]
    params = GenerationParams(max_new_tokens=12, stop_token_ids=(tok.eos_token_id,))

    if mode == "separate":
        losses, generations = backend.score(prompts, references), backend.generate(prompts, params)
    else:
        losses, generations = backend.score_and_generate(prompts, references, params)
        assert backend.shared_prefill, "plain architectures must take the shared-prefill path"
    for pair, loss in zip(pairs, losses):
        assert loss == pytest.approx(reference_ce(model, pair.prompt_ids, pair.reference_ids), rel=1e-3)
    for pair, generation in zip(pairs, generations):
        expected, stopped = expected_greedy(model, tok, pair.prompt_ids, 12)
        assert generation.token_ids == expected
        assert generation.finish_reason == ("stop" if stopped else "length")
        assert generation.text == tok.decode(expected, skip_special_tokens=True)


def test_shared_prefill_keeps_no_repeat_ngram(tiny_gpt2):
    backend = HFBackend.from_pretrained(tiny_gpt2, device="cpu", dtype="float32", batch_size=4)
    tok = backend.tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    pairs = encode_pairs(tok, PROMPTS, REFERENCES)
    params = GenerationParams(max_new_tokens=24, no_repeat_ngram_size=2, stop_token_ids=(tok.eos_token_id,))
    _, generations = backend.score_and_generate([p.prompt_ids for p in pairs], [p.reference_ids for p in pairs], params)
    for pair, generation in zip(pairs, generations):
        assert generation.token_ids == expected_greedy(model, tok, pair.prompt_ids, 24, no_repeat_ngram_size=2)[0]


def test_models_that_cannot_share_the_prefill_use_separate_passes(tiny_gpt2, monkeypatch):
    def unusual_cache(self, *args, **kwargs):
        raise NotImplementedError("this cache cannot be sliced")

    monkeypatch.setattr(HFBackend, "_prefill_score_generate", unusual_cache)
    backend = HFBackend.from_pretrained(tiny_gpt2, device="cpu", dtype="float32")
    tok = backend.tokenizer
    prompts = [tok("hello there", add_special_tokens=False)["input_ids"]]
    references = [tok("general kenobi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    params = GenerationParams(max_new_tokens=5)
    losses, generations = backend.score_and_generate(prompts, references, params)
    assert backend.shared_prefill is False
    assert losses == backend.score(prompts, references)
    assert [g.token_ids for g in generations] == [g.token_ids for g in backend.generate(prompts, params)]


def test_reference_groups_bound_padding():
    from srdata.backends.batching import similar_length_groups

    lengths = [3, 256, 4, 5, 60, 2, 250, 64]
    groups = similar_length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:  # padded width stays within the rule's bound
        tokens = sum(lengths[i] for i in group)
        assert len(group) * max(lengths[i] for i in group) <= 1.25 * tokens + 32
    assert {1, 6} in [set(g) for g in groups] and not any({0, 1} <= set(g) for g in groups)


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
    with pytest.raises(ValueError, match="no tokens"):
        backend.score_and_generate([[1, 2]], [[]], GenerationParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.score_and_generate([[1, 2]], [[3]], GenerationParams(max_new_tokens=0))


def test_one_token_prompts_score_and_generate_like_separate_passes(tiny_gpt2):
    backend = HFBackend.from_pretrained(tiny_gpt2, device="cpu", dtype="float32")
    prompts, references = [[5], [6]], [[7, 8, 2], [9, 2]]
    params = GenerationParams(max_new_tokens=4)
    losses, generations = backend.score_and_generate(prompts, references, params)
    assert losses == pytest.approx(backend.score(prompts, references), rel=1e-6)
    assert [g.token_ids for g in generations] == [g.token_ids for g in backend.generate(prompts, params)]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_scoring_and_generation_get_no_deprecation_notice_from_transformers(request, fixture):
    """Every cache path (shared prefill into a StaticCache, reference continuation on a
    DynamicCache, separate passes, n-gram blocking) uses transformers' current API."""
    from ._warnings import deprecation_notices

    path = request.getfixturevalue(fixture)
    with deprecation_notices() as notices:
        backend = HFBackend.from_pretrained(path, device="cpu", dtype="float32", batch_size=3, prefill_chunk_tokens=16)
        pairs = encode_pairs(backend.tokenizer, PROMPTS, REFERENCES)
        prompts, references = [p.prompt_ids for p in pairs], [p.reference_ids for p in pairs]
        params = GenerationParams(max_new_tokens=6, no_repeat_ngram_size=2, stop_token_ids=(backend.tokenizer.eos_token_id,))
        backend.score_and_generate(prompts, references, params)
        assert backend.shared_prefill
        backend.score(prompts, references)
        backend.generate(prompts, params)
    assert not notices, notices


def test_cache_keyword_follows_the_transformers_signature():
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); older ones know only the old name."""
    from srdata.backends.hf import cache_keyword

    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert cache_keyword(New()) == "cache" and cache_keyword(Old()) == "past_key_values"


def test_progress_moves_during_a_batch_and_adds_up(tiny_llama):
    """The bar must move within seconds on a slow model: tokens are reported per decode step, rows per batch."""
    from srdata.backends import GenerationParams
    from srdata.backends.hf import HFBackend

    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32", batch_size=64)
    tokenizer = backend.tokenizer
    prompts = [tokenizer(f"Below is task {i}: say something", add_special_tokens=True)["input_ids"] for i in range(6)]
    references = [tokenizer(" ok", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _ in prompts]
    params = GenerationParams(max_new_tokens=12, stop_token_ids=(tokenizer.eos_token_id,))
    for call in ("both", "generate"):
        calls: list[tuple[int, int]] = []
        if call == "both":
            _, generations = backend.score_and_generate(prompts, references, params, lambda r, t: calls.append((r, t)))
            expected = sum(len(p) + len(r) + len(g.token_ids) for p, r, g in zip(prompts, references, generations))
        else:
            generations = backend.generate(prompts, params, lambda r, t: calls.append((r, t)))
            expected = sum(len(p) + len(g.token_ids) for p, g in zip(prompts, generations))
        assert len(calls) >= 5 and all(r == 0 for r, _ in calls[:-1])  # tokens while the one batch decodes
        assert sum(r for r, _ in calls) == len(prompts) and sum(t for _, t in calls) == expected


def test_bfloat16_keeps_the_shared_prefill(smollm2):
    # bfloat16 rounds the shared and separate paths differently (0.56% on the check's rows):
    # the 1e-3 check tolerance sent every bfloat16 run to separate passes (issue 28).
    backend = HFBackend.from_pretrained(smollm2, device="cpu", dtype="bfloat16")
    assert backend._shared_prefill_matches()


def _first_row_position_off_by_one(monkeypatch):
    """Make the shared path score the first check row one position late: a bug the check must catch."""
    continuation = HFBackend._score_continuation

    def off_by_one(self, cache, rows, input_ids, attention_mask, positions, references):
        shifted = positions.clone()
        shifted[0] += 1
        return continuation(self, cache, rows, input_ids, attention_mask, shifted, references)

    monkeypatch.setattr(HFBackend, "_score_continuation", off_by_one)


def test_bfloat16_check_catches_a_position_off_by_one(smollm2, monkeypatch, caplog):
    # On SmolLM2 that bug moves the first row's bfloat16 loss by ~0.5%, inside the 1.6% a
    # bfloat16 check must allow; the float32 copy of the same weights sees it (0.4% > 1e-3).
    _first_row_position_off_by_one(monkeypatch)
    backend = HFBackend.from_pretrained(smollm2, device="cpu", dtype="bfloat16")
    import srdata.backends.hf as hf

    packed = []  # the float32 copy is not packed: exact anyway (packed.py), and another copy of the weights
    monkeypatch.setattr(hf, "use_packed_linears", lambda model, hint: packed.append(model) or 0)
    with caplog.at_level("INFO", logger="srdata.backends.hf"):
        assert backend._shared_prefill_matches() is False
    assert "float32 copy" in caplog.text and packed == []
    assert next(backend.model.parameters()).dtype == torch.bfloat16  # the run's own model is untouched

    # Without the float32 copy (memory short) the bfloat16 tolerance alone lets it through, and says so.
    from srdata.backends import prefill_check

    monkeypatch.setattr(prefill_check, "available_memory", lambda device: 1 << 20)
    with caplog.at_level("WARNING", logger="srdata.backends.prefill_check"):
        assert backend._shared_prefill_matches() is True
    assert "16-bit tolerance only" in caplog.text


def test_float32_copy_is_exact_and_leaves_the_model_alone(smollm2):
    from srdata.backends.prefill_check import float32_copy

    backend = HFBackend.from_pretrained(smollm2, device="cpu", dtype="bfloat16")
    model = backend.model
    from srdata.backends.packed import installed_packed_forward

    packed = [m for m in model.modules() if installed_packed_forward(m)]
    assert packed, "bfloat16 linears run packed on this CPU (packed.py)"
    norm = model.model.norm
    norm.forward = norm.forward  # an instance forward some other library set (as accelerate's hooks do): it stays
    twin = float32_copy(model)
    assert all(p.dtype == torch.float32 for p in twin.parameters())
    assert not any(installed_packed_forward(m) for m in twin.modules()), "the original's packed forwards stay behind"
    assert "forward" in twin.model.norm.__dict__
    del norm.forward
    for (name, mine), (_, theirs) in zip(model.named_parameters(), twin.named_parameters()):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine.float(), theirs), name
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight  # tying kept
    # Independent reference: transformers' own float32 cast of the bfloat16 checkpoint.
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).float()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_grouped_decode_attention_matches_transformers_sdpa(tiny_llama):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from srdata.backends.attention import NAME, grouped_decode_sdpa

    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    assert backend.model.config._attn_implementation == NAME
    module = backend.model.model.layers[0].self_attn
    assert module.num_key_value_groups > 1
    torch.manual_seed(0)
    heads, kv_heads, dim = module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim
    query, key, value = torch.randn(4, heads, 1, dim), torch.randn(4, kv_heads, 9, dim), torch.randn(4, kv_heads, 9, dim)
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    for attention_mask in (mask, None):
        got, _ = grouped_decode_sdpa(module, query, key, value, attention_mask, scaling=module.scaling)
        expected, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=module.scaling)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_prefill_runs_each_chunk_at_its_own_width(tiny_llama):
    # One long prompt and three short ones: the short ones' prefill must not be padded to the long one's width.
    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32", prefill_chunk_tokens=64)
    prompts = [list(range(3, 43)), [5, 6, 7, 8, 9], [7, 8, 9, 10], [9, 10, 11, 12, 13]]
    fed: list[tuple[int, int]] = []
    hook = backend.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            ids, mask = backend._left_padded(prompts)
            backend._prefill(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), ids.shape[1] + 4)
    finally:
        hook.remove()
    assert sorted(fed) == [(1, 39), (3, 4)]
    # ... and the shared prefill still scores and generates like the separate passes.
    params = GenerationParams(max_new_tokens=6)
    references = [[4, 5], [6], [7, 8, 9], [10]]
    losses, generations = backend.score_and_generate(prompts, references, params)
    assert losses == pytest.approx(backend.score(prompts, references), rel=1e-5)
    assert [g.token_ids for g in generations] == [g.token_ids for g in backend.generate(prompts, params)]


def test_a_model_that_cannot_be_copied_keeps_the_16_bit_check_and_says_so(tiny_llama, monkeypatch, caplog):
    from srdata.backends import prefill_check

    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="bfloat16")
    deepcopy = prefill_check.copy.deepcopy

    def refuse(obj, memo=None):  # only the model cannot be copied (as one holding a lock would)
        if obj is backend.model:
            raise TypeError("cannot pickle '_thread.lock' object")
        return deepcopy(obj, memo)

    monkeypatch.setattr(prefill_check.copy, "deepcopy", refuse)
    with caplog.at_level("WARNING", logger="srdata.backends.prefill_check"):
        assert backend._shared_prefill_matches() is True
    assert "TypeError: cannot pickle" in caplog.text and "16-bit tolerance only" in caplog.text
