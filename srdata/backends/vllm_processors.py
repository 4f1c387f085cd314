"""vLLM glue that depends on which model runner executes the engine.

vLLM has two GPU model runners and each loads custom logits processors through its own
interface (facts from vLLM 0.32.0 / 0.33.0, whose files below are identical):

* **V1 runner** (``vllm/v1/worker/gpu_model_runner.py``): processors subclass
  ``vllm.v1.sample.logits_processor.LogitsProcessor``; they are built as
  ``cls(vllm_config, device, is_pin_memory)``, told about batch changes through
  ``update_state(BatchUpdate)`` (removed, added, moved; an added entry carries the
  request's prompt ids and a live reference to its output-id list) and called as
  ``apply(logits)``.
* **Model Runner V2** (``vllm/v1/worker/gpu/``, the default on CUDA since vLLM 0.29 for
  every supported configuration): processors subclass
  ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`` (vLLM >= 0.31); they are
  built as ``cls(vllm_config, req_states)``, told about each request with
  ``add_request(slot, sampling_params) -> bool`` (slots are recycled, there is no remove
  call) and called as ``apply(logits, ctx)``; token history is read on the device from
  ``req_states.all_token_ids`` / ``total_len``. Each loader rejects a class that does not
  subclass its own base with a ``ValueError`` raised by ``vllm.LLM(...)`` itself.

:class:`NoRepeatNGramLogitsProcessor` here subclasses **both** bases (the V2 one only
where it exists) and dispatches on the constructor call, so one ``"module:Class"`` name
(:data:`NGRAM_PROCESSOR_FQCN`) works whichever runner vLLM picks. Its V1 path is the
:class:`NGramBlocker` bookkeeping; its V2 path bans the same
tokens with a few batched tensor operations on the device (no host sync without
speculative decoding). All of that logic lives in plain functions taking objects shaped
like vLLM's, so it is tested on a CPU without vLLM; the class is built on first use.

The module also sizes ``max_num_batched_tokens`` for prompt-logprob scoring on the V1
runner (:func:`safe_max_num_batched_tokens`): see that function for the memory model.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

INSTALL_HINT = "pip install 'srdata[vllm]'"
# Key of the per-request argument read by the n-gram logits processor.
NGRAM_ARG = "srdata_no_repeat_ngram_size"
# vLLM loads custom logits processors by "<module>:<class>", in the frontend (to validate
# requests) and in every worker.
NGRAM_PROCESSOR_FQCN = f"{__name__}:NoRepeatNGramLogitsProcessor"

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


# ------------------------------------------------------------------ the n-gram ban
class NGramBlocker:
    """Tokens banned by ``no_repeat_ngram_size`` for one request, updated incrementally.

    Bans exactly what transformers' ``NoRepeatNGramLogitsProcessor`` bans for the
    sequence ``prompt_ids + output_ids``: every token that would complete an n-gram
    already present. ``output_ids`` may be a live list that grows between calls (vLLM
    hands logits processors a reference to the request's output list); only the n-grams
    ending in new tokens are added, so each step costs O(n), not O(length).

    Example:
        >>> out = [1, 2]
        >>> blocker = NGramBlocker(2, [1, 2, 3], out)
        >>> sorted(blocker.banned())  # "2" was followed by "3" before
        [3]
    """

    def __init__(self, n: int, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        if n < 1:
            raise ValueError(f"no_repeat_ngram_size must be >= 1, got {n}")
        self.n = n
        self.prompt_ids = prompt_ids
        self.output_ids = output_ids
        self._table: dict[tuple[int, ...], set[int]] = {}
        self._next_start = 0  # first n-gram start index not yet in the table
        self._seen_output = 0

    def _token(self, i: int) -> int:
        p = len(self.prompt_ids)
        return int(self.prompt_ids[i] if i < p else self.output_ids[i - p])

    def _window(self, start: int, stop: int) -> tuple[int, ...]:
        return tuple(self._token(i) for i in range(start, stop))

    def banned(self) -> frozenset[int]:
        """Tokens that may not come next."""
        if len(self.output_ids) < self._seen_output:  # the request was reset: rebuild
            self._table, self._next_start = {}, 0
        self._seen_output = len(self.output_ids)
        length = len(self.prompt_ids) + len(self.output_ids)
        n = self.n
        for start in range(self._next_start, length - n + 1):
            self._table.setdefault(self._window(start, start + n - 1), set()).add(self._token(start + n - 1))
        self._next_start = max(self._next_start, length - n + 1)
        if length < n - 1:
            return frozenset()
        return frozenset(self._table.get(self._window(length - n + 1, length), ()))


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


def model_runner_of(vllm_config: Any) -> str:
    """``"v2"`` or ``"v1"``: the runner a built ``VllmConfig`` selects (``use_v2_model_runner``).

    Works on ``llm.llm_engine.vllm_config`` after the engine is built, or on
    ``EngineArgs(**kwargs).create_engine_config()`` before (it reads the model's config,
    not its weights). vLLM before 0.22 has no such property: V1.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> model_runner_of(NS(use_v2_model_runner=True)), model_runner_of(NS())
        ('v2', 'v1')
    """
    return "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1"


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


# --------------------------------------------------------------- per-request option
def requested_ngram_size(sampling_params: Any) -> int:
    """The request's ``no_repeat_ngram_size`` (0 when it did not ask); invalid values raise.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> requested_ngram_size(NS(extra_args={NGRAM_ARG: 3})), requested_ngram_size(NS(extra_args=None))
        (3, 0)
    """
    extra = getattr(sampling_params, "extra_args", None) or {}
    n = extra.get(NGRAM_ARG)
    if n is None:
        return 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{NGRAM_ARG} must be an int >= 1, got {n!r}")
    return n


# ------------------------------------------------------------------- V1 runner path
def update_blockers(blockers: dict[int, NGramBlocker], batch_update: Any) -> None:
    """Apply a V1 ``BatchUpdate`` to the per-row blockers (vLLM's order: removed, added, moved).

    An added request that did not ask for the ban clears its row; a move is one-way unless
    its direction is ``MoveDirectionality.SWAP``.
    """
    if batch_update is None:
        return
    for index in batch_update.removed:
        blockers.pop(index, None)
    for index, params, prompt_ids, output_ids in batch_update.added:
        n = requested_ngram_size(params) if params is not None else 0
        if n and prompt_ids is not None:
            blockers[index] = NGramBlocker(n, prompt_ids, output_ids)
        else:
            blockers.pop(index, None)
    for a, b, direction in batch_update.moved:
        moved_a, moved_b = blockers.pop(a, None), blockers.pop(b, None)
        if moved_a is not None:
            blockers[b] = moved_a
        if getattr(direction, "name", direction) == "SWAP" and moved_b is not None:
            blockers[a] = moved_b


def ban_blocked_tokens(logits: Any, blockers: Mapping[int, NGramBlocker]) -> Any:
    """Set ``-inf`` where a row's blocker bans a token: one scatter for the batch (V1 ``apply``)."""
    import torch

    rows: list[int] = []
    cols: list[int] = []
    vocab = logits.shape[-1]
    for row, blocker in blockers.items():
        banned = [t for t in blocker.banned() if 0 <= t < vocab]
        rows += [row] * len(banned)
        cols += banned
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits[index] = float("-inf")
    return logits


# ------------------------------------------------------------- Model Runner V2 path
def ngram_rows(ngram_sizes: Any, idx_mapping_np: Any, num_rows: int, expanded_idx_mapping: Any) -> tuple[Any, Any, Any]:
    """Host arrays ``(rows, slots, n)`` of the logits rows whose request asked for the ban.

    Without speculative decoding there is one logits row per request, in batch order, so
    the host copy ``idx_mapping_np`` maps rows to request slots and nothing is read back
    from the device. With drafts (more rows than requests) the device map is copied once.

    Example:
        >>> import numpy as np
        >>> ngram_rows(np.array([0, 3, 0, 2]), np.array([2, 1, 3]), 3, None)
        (array([1, 2]), array([1, 3]), array([3, 2]))
    """
    import numpy as np

    if num_rows == len(idx_mapping_np):
        slots = np.asarray(idx_mapping_np, dtype=np.int64)
    else:
        slots = np.asarray(expanded_idx_mapping.detach().cpu().numpy(), dtype=np.int64)
    sizes = np.asarray(ngram_sizes)[slots]
    rows = np.nonzero(sizes > 0)[0]
    return rows, slots[rows], sizes[rows]


def history_matrix(
    all_token_ids: Any,
    total_len: Any,
    slots: Any,
    rows: Any,
    local_pos: Any,
    input_ids: Any,
    width: int,
    drafts: bool,
) -> Any:
    """``[len(rows), width]`` int64 tokens each row sees: committed ids, then this step's drafts.

    Committed ids are ``all_token_ids[slot, :total_len[slot]]`` (prompt + output, updated on
    the device after every step). Under speculative decoding the row at local position
    ``p`` of a request also sees drafts ``1..p``, which are only in ``input_ids`` (the row at
    local position 0 holds the last committed token). Entries past a row's length are junk.
    """
    import torch

    device = all_token_ids.device
    cols = torch.arange(width, device=device)
    take = min(width, all_token_ids.shape[1])
    history = all_token_ids[slots][:, :take].long()
    if take < width:
        history = torch.nn.functional.pad(history, (0, width - take))
    if not drafts:
        return history
    committed = total_len[slots].long()
    first_row = rows - local_pos[rows].long()
    index = (first_row[:, None] + cols[None, :] - committed[:, None] + 1).clamp_(0, input_ids.shape[0] - 1)
    return torch.where(cols[None, :] < committed[:, None], history, input_ids.long()[index])


def ban_repeated_ngrams_(logits: Any, rows: Any, history: Any, lengths: Any, n: int) -> Any:
    """Set ``-inf`` at ``logits[row, t]`` for every ``t`` that would repeat an n-gram of the row.

    Row ``g``'s sequence is ``history[g, :lengths[g]]``; as in transformers'
    ``NoRepeatNGramLogitsProcessor``, ``t`` is banned when some earlier n-gram starts with
    the sequence's last ``n - 1`` tokens and ends in ``t``. Vectorised over rows and n-gram
    starts; the write is a ``scatter_reduce(amin)`` of ``-inf`` (match) or ``+inf`` (no
    match), so it needs no host sync and duplicates are harmless. ``logits`` must be
    contiguous; it is modified in place and returned.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 5)
        >>> _ = ban_repeated_ngrams_(logits, torch.tensor([0]), torch.tensor([[1, 2, 1]]), torch.tensor([3]), 2)
        >>> logits[0].tolist()  # "1" was followed by "2"
        [0.0, 0.0, -inf, 0.0, 0.0]
    """
    import torch

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    width = history.shape[1]
    m = n - 1
    starts = width - m  # n-gram start positions that fit in the matrix
    if starts <= 0 or rows.numel() == 0:
        return logits
    device = history.device
    lengths = lengths.long().clamp(max=width)
    match = torch.arange(starts, device=device)[None, :] <= (lengths[:, None] - n)
    if m:
        suffix_index = (lengths[:, None] - m + torch.arange(m, device=device)[None, :]).clamp_(0, width - 1)
        suffix = history.gather(1, suffix_index)
        for k in range(m):
            match &= history[:, k : k + starts] == suffix[:, k : k + 1]
    banned = history[:, m : m + starts]
    vocab = logits.shape[1]
    match &= (banned >= 0) & (banned < vocab)
    flat = rows.long()[:, None] * vocab + banned.clamp(0, vocab - 1)
    inf = torch.tensor(float("inf"), dtype=logits.dtype, device=logits.device)
    src = torch.where(match.to(logits.device), -inf, inf)
    logits.view(-1).scatter_reduce_(0, flat.reshape(-1).to(logits.device), src.reshape(-1), reduce="amin")
    return logits


def history_width(ctx: Any, rows: Any, drafts: bool, max_model_len: int, num_reqs: int) -> int:
    """Host upper bound on the rows' sequence lengths (columns of :func:`history_matrix`).

    Uses ``ctx.seq_lens_upper_bound_np`` (per batch position; exact without drafts);
    without it, the longest possible sequence.
    """
    bound = getattr(ctx, "seq_lens_upper_bound_np", None)
    if bound is None:
        return max_model_len + (0 if not drafts else 64)
    bound = bound[:num_reqs]
    width = int(bound.max()) if drafts else int(bound[rows].max())
    return max(width, 1)


def apply_ngram_ban_v2(logits: Any, ctx: Any, req_states: Any, ngram_sizes: Any) -> Any:
    """Model Runner V2 ``apply``: ban repeated n-grams in the rows of requests that asked.

    ``ngram_sizes[slot]`` is the request's n (0 = off); ``req_states`` is vLLM's
    ``LogitsProcRequestState`` (``all_token_ids.gpu``, ``total_len.gpu``, ``max_num_reqs``);
    ``ctx`` is the step's ``LogitsContext``. Row ``r`` sees ``ctx.pos[r] + 1`` tokens.
    """
    import numpy as np
    import torch

    num_rows = logits.shape[0]
    num_reqs = len(ctx.idx_mapping_np)
    rows_np, slots_np, sizes_np = ngram_rows(ngram_sizes, ctx.idx_mapping_np, num_rows, ctx.expanded_idx_mapping)
    if rows_np.size == 0:
        return logits
    if not logits.is_contiguous():
        logits = logits.contiguous()
    drafts = num_rows != num_reqs
    all_token_ids = req_states.all_token_ids.gpu
    width = history_width(ctx, rows_np, drafts, all_token_ids.shape[1], num_reqs)
    device = all_token_ids.device
    rows = torch.as_tensor(rows_np, device=device)
    slots = torch.as_tensor(slots_np, device=device)
    history = history_matrix(
        all_token_ids,
        req_states.total_len.gpu,
        slots,
        rows,
        ctx.expanded_local_pos.to(device),
        ctx.input_ids.to(device),
        width,
        drafts,
    )
    lengths = ctx.pos.to(device)[rows].long() + 1
    for n in np.unique(sizes_np):
        pick = torch.as_tensor(np.nonzero(sizes_np == n)[0], device=device)
        ban_repeated_ngrams_(logits, rows[pick], history[pick], lengths[pick], int(n))
    return logits


# ------------------------------------------------------------------- the processor
def _build_processor_class() -> type:
    """Define the processor against the installed vLLM (both runner bases where available)."""
    import numpy as np
    import torch
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

    try:  # vLLM >= 0.31
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor
    except ImportError:
        V2LogitsProcessor = None
    bases = (V1LogitsProcessor,) if V2LogitsProcessor is None else (V1LogitsProcessor, V2LogitsProcessor)

    class NoRepeatNGramLogitsProcessor(*bases):  # type: ignore[misc]
        """``no_repeat_ngram_size`` for requests with ``SamplingParams(extra_args={NGRAM_ARG: n})``.

        Built by the V1 runner as ``cls(vllm_config, device, is_pin_memory)`` and by Model
        Runner V2 as ``cls(vllm_config, req_states)``; each call path below serves one.
        """

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            requested_ngram_size(sampling_params)

        def __init__(self, vllm_config: Any, *args: Any) -> None:
            if len(args) == 2:  # V1: (device, is_pin_memory)
                self.runner = "v1"
                self.blockers: dict[int, NGramBlocker] = {}
            elif len(args) == 1:  # V2: (req_states,)
                self.runner = "v2"
                self.req_states = args[0]
                self.ngram_sizes = np.zeros(self.req_states.max_num_reqs, dtype=np.int64)
            else:
                raise TypeError(f"unexpected constructor arguments for a vLLM logits processor: {args!r}")

        # ---- V1 interface
        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy choices

        def update_state(self, batch_update: Any) -> None:
            update_blockers(self.blockers, batch_update)

        # ---- V2 interface
        def add_request(self, req_idx: int, sampling_params: Any) -> bool:
            n = requested_ngram_size(sampling_params)
            self.ngram_sizes[req_idx] = n  # always overwrite: slots are recycled
            return n > 0

        def apply_staged_writes(self) -> None:
            pass  # all state is on the host

        # ---- both
        def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
            if self.runner == "v1":
                return ban_blocked_tokens(logits, self.blockers)
            return apply_ngram_ban_v2(logits, ctx, self.req_states, self.ngram_sizes)

    # Pickling by reference and vLLM's "<module>:<class>" loader both find it here.
    NoRepeatNGramLogitsProcessor.__module__ = __name__
    NoRepeatNGramLogitsProcessor.__qualname__ = "NoRepeatNGramLogitsProcessor"
    return NoRepeatNGramLogitsProcessor


def __getattr__(name: str) -> Any:
    # The class subclasses vLLM's bases, so it is defined only when vLLM (or the engine) asks.
    if name == "NoRepeatNGramLogitsProcessor":
        try:
            cls = _build_processor_class()
        except ImportError as err:  # keep hasattr() and getattr(..., default) working without vLLM
            raise AttributeError(f"{name} needs vLLM ({INSTALL_HINT})") from err
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
