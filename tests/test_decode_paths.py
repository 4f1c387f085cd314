"""The transformers backend's fast decode paths give plain transformers' results (issue 28).

Each path gets a check that it is taken (rows dropped, columns skipped, packed weights
used), beside the check that the results are unchanged.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from srdata.backends import GenerationParams
from srdata.backends.hf import HFBackend


def test_grouped_attention_reads_only_visible_key_columns_and_matches_sdpa(tiny_llama, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import srdata.backends.attention as attention

    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    module = backend.model.model.layers[0].self_attn
    heads, kv_heads, dim = module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim
    assert kv_heads < heads
    torch.manual_seed(0)
    keys_read: list[tuple[int, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: keys_read.append(tuple(k.shape)) or sdpa(q, k, v, **kw))
    rows, width, room = 6, 40, 8  # prompts left padded to 40 columns, 8 empty columns after them
    prompt_lengths = [40, 38, 35, 12, 10, 3]
    for q_len in (1, 4):  # a decode step, and a 4-token reference scored after its prompt
        mask = torch.zeros(rows, 1, q_len, width + room, dtype=torch.bool)
        for row, length in enumerate(prompt_lengths):
            mask[row, 0, :, width - length : width] = True
            mask[row, 0, :, width : width + q_len] = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))
        query = torch.randn(rows, heads, q_len, dim)
        key, value = torch.randn(rows, kv_heads, width + room, dim), torch.randn(rows, kv_heads, width + room, dim)
        keys_read.clear()
        got, _ = attention.grouped_decode_sdpa(module, query, key, value, mask, scaling=module.scaling)
        read = list(keys_read)
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=module.scaling)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # KV heads not repeated; long and short prompts in separate runs; empty columns never read
        assert all(shape[1] == kv_heads for shape in read)
        assert len(read) >= 2 and sum(shape[0] for shape in read) == rows
        assert max(shape[2] for shape in read) == width + q_len and min(shape[2] for shape in read) < 20


def test_key_spans_cover_every_visible_column():
    from srdata.backends.attention import key_spans

    torch.manual_seed(1)
    for _ in range(50):
        rows, keys = 7, 30
        starts = sorted(torch.randint(0, 25, (rows,)).tolist())
        end = int(torch.randint(26, keys + 1, ()).item())
        mask = torch.zeros(rows, 1, 1, keys, dtype=torch.bool)
        for row, start in enumerate(starts):
            mask[row, ..., start:end] = True
        spans = key_spans(mask, rows, keys)
        assert [a for a, *_ in spans] == sorted({a for a, *_ in spans}) and spans[0][0] == 0 and spans[-1][1] == rows
        for a, b, start, stop in spans:
            outside = mask[a:b].clone()
            outside[..., start:stop] = False
            assert not outside.any(), (spans, starts, end)


def _greedy_one_row(model, prompt, steps, stop_ids):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    ids = out[0, len(prompt):].tolist()
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


def test_decoding_drops_rows_that_stopped_and_matches_generate(tiny_llama):
    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [21, 22, 23, 24], [31, 32], [41, 42, 43, 44, 45], [51, 52, 53]]
    steps = 12
    free_run = [_greedy_one_row(model, p, steps, [-1]) for p in prompts]
    stop_ids = (free_run[0][1], free_run[1][2])  # rows 0 and 1 stop early; others when (if) they produce these
    expected = [_greedy_one_row(model, p, steps, list(stop_ids)) for p in prompts]
    assert min(map(len, expected)) < steps - 2 < max(map(len, expected))
    rows_fed: list[int] = []
    hook = backend.model.register_forward_pre_hook(lambda m, args, kwargs: rows_fed.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        references = [[3, 4]] * len(prompts)
        losses, generations = backend.score_and_generate(prompts, references, GenerationParams(steps, stop_token_ids=stop_ids))
    finally:
        hook.remove()
    assert backend.shared_prefill
    assert [g.token_ids for g in generations] == expected
    assert [g.finish_reason for g in generations] == ["stop" if len(e) < steps else "length" for e in expected]
    decode_steps = rows_fed[-steps:]  # the longest answer runs all the steps
    assert decode_steps[0] == len(prompts) and decode_steps[-1] < len(prompts)  # the stopped rows left the batch


def test_packed_linear_weights_are_used_only_where_exact(tiny_llama):
    from srdata.backends.packed import packs_identically

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9]])
    for dtype in (torch.bfloat16, torch.float32):
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype).eval()
        backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype=str(dtype).removeprefix("torch."))
        packed = [m for m in backend.model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]
        exact = packs_identically(dtype)
        assert bool(packed) == exact
        if dtype == torch.bfloat16 and not exact:
            pytest.skip("this CPU's packed bfloat16 kernels do not give identical results")
        with torch.inference_mode():
            assert torch.equal(backend.model(ids).logits, plain(ids).logits)


def test_greedy_answers_ignore_the_models_own_generation_defaults(tiny_llama, tmp_path):
    # Defaults in a model's generation_config.json (a repetition penalty, suppressed tokens)
    # changed generate()'s answers (the separate passes) but not the decode loop's or vLLM's
    # requests: every path is the plain argmax now.
    import shutil

    from transformers import GenerationConfig

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 11, 12]]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    argmax = [_greedy_one_row(model, p, 10, [-1]) for p in prompts]
    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_llama, folder)
    GenerationConfig(suppress_tokens=[a[0] for a in argmax], repetition_penalty=5.0).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert [_greedy_one_row(model, p, 10, [-1]) for p in prompts] != argmax  # generate() applies the saved defaults
    backend = HFBackend.from_pretrained(folder, device="cpu", dtype="float32")
    params = GenerationParams(10, stop_token_ids=(-1,))
    assert [g.token_ids for g in backend.generate(prompts, params)] == argmax
    assert [g.token_ids for g in backend.score_and_generate(prompts, [[3, 4]] * 2, params)[1]] == argmax


def test_each_layer_shape_is_packed_only_where_its_own_results_are_identical(smollm2, monkeypatch):
    # The dtype probe runs one shape; oneDNN picks kernels by shape. With that probe forced
    # open for float32 (whose packed kernels sum in another order here), every layer must
    # still give the plain model's numbers.
    import srdata.backends.packed as packed

    monkeypatch.setattr(packed, "packs_identically", lambda dtype, *a, **k: True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9]])
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model(ids).logits
        packed.use_packed_linears(model)
        assert torch.equal(model(ids).logits, expected)


def test_packed_weights_never_answer_for_weights_changed_after_packing(tiny_llama):
    from srdata.backends.packed import packs_identically

    if not packs_identically(torch.bfloat16):
        pytest.skip("this CPU's packed bfloat16 kernels do not give identical results")
    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="bfloat16")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    layer = backend.model.model.layers[0].mlp.up_proj
    assert "forward" in vars(layer)  # packed
    with torch.no_grad():
        layer.weight.mul_(2.0)  # changed in place after packing (a state dict loaded, a training step)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        plain.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    with torch.inference_mode():
        assert torch.equal(backend.model(ids).logits, plain(ids).logits)
    # and with gradients wanted, they flow to the weights
    backend.model.zero_grad()
    backend.model(ids).logits.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_greedy_choice_is_the_float32_argmax_ties_included():
    from srdata.backends.decode import greedy_choice

    torch.manual_seed(2)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logits = torch.randint(-3, 4, (64, 4099)).to(dtype) * 0.5  # few distinct values: many ties per row
        logits[::5, 100:] = -float("inf")  # banned ids (no_repeat_ngram_size) and a row whose max sits early
        logits[3, :] = -float("inf")
        assert torch.equal(greedy_choice(logits), logits.float().argmax(-1)), dtype


def test_bfloat16_decode_chooses_tokens_without_a_float32_copy_of_the_logits(tiny_llama, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    import srdata.backends.hf as hf

    class WideFloat32(TorchDispatchMode):  # records every float32 result as wide as the vocabulary
        def __init__(self, vocab: int) -> None:
            super().__init__()
            self.vocab, self.seen = vocab, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape[-1:] == (self.vocab,):
                self.seen.append((str(func), tuple(out.shape)))
            return out

    backend = HFBackend.from_pretrained(tiny_llama, device="cpu", dtype="bfloat16")
    recorder = WideFloat32(backend.model.config.vocab_size)
    decode, calls = hf.greedy_decode, []

    def recorded(model, *args, **kwargs):
        if next(model.parameters()).dtype == torch.float32:  # a float32 copy the backend may check the cache on
            return decode(model, *args, **kwargs)
        with recorder:
            answers = decode(model, *args, **kwargs)
        calls.append(answers)
        return answers

    monkeypatch.setattr(hf, "greedy_decode", recorded)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [21, 22, 23, 24]]
    _, generations = backend.score_and_generate(prompts, [[3, 4]] * 3, GenerationParams(6, stop_token_ids=(-1,), no_repeat_ngram_size=2))
    assert backend.shared_prefill  # its one-off check: greedy_decode's answers equal generate()'s (which argmaxes float32)
    assert calls and [len(g.token_ids) for g in generations] == [6, 6, 6]
    assert recorder.seen == []


def test_compaction_gathers_the_kept_rows_in_place_without_a_new_cache(tiny_llama, monkeypatch):
    import transformers

    from srdata.backends.decode import compacted

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    cache = transformers.StaticCache(config=model.config, max_cache_len=12)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13], [4, 5, 6]]), past_key_values=cache, use_cache=True)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    built = []
    monkeypatch.setattr(transformers.StaticCache, "__init__", lambda self, *a, **k: built.append(1))
    keep = torch.tensor([0, 2, 3])
    smaller = compacted(cache, keep)
    assert smaller is cache and not built  # one gather per layer, no new zero-filled cache
    for layer, (keys, values) in zip(smaller.layers, before):
        assert torch.equal(layer.keys, keys[keep]) and torch.equal(layer.values, values[keep])
        assert not layer.keys[:, :, 3:].any()  # the room after the written columns is still empty
    assert int(smaller.layers[0].get_seq_length()) == 3
