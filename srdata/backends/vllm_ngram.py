"""``no_repeat_ngram_size`` for vLLM: a custom logits processor for both model runners.

vLLM has two GPU model runners and each loads custom logits processors through its own
interface (facts from vLLM 0.32.0 / 0.33.0, whose files below are identical):

* **V1 runner** (``vllm/v1/worker/gpu_model_runner.py``): processors subclass
  ``vllm.v1.sample.logits_processor.LogitsProcessor``; they are built as
  ``cls(vllm_config, device, is_pin_memory)``, told about batch changes through
  ``update_state(BatchUpdate)`` (removed, added, moved; an added entry carries the
  request's prompt ids and a live reference to its output-id list) and called as
  ``apply(logits)``.
* **Model Runner V2** (``vllm/v1/worker/gpu/``, the default on CUDA since vLLM 0.29 for
  every supported configuration, the only runner from 0.34 on, whose interface is
  unchanged there): processors subclass
  ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`` (vLLM >= 0.31); they are
  built as ``cls(vllm_config, req_states)``, told about each request with
  ``add_request(slot, sampling_params) -> bool`` (slots are recycled, there is no remove
  call) and called as ``apply(logits, ctx)``; token history is read on the device from
  ``req_states.all_token_ids`` / ``total_len``. Each loader rejects a class that does not
  subclass its own base with a ``ValueError`` raised by ``vllm.LLM(...)`` itself.

:class:`NoRepeatNGramLogitsProcessor` here subclasses **both** bases (the V2 one only
where it exists, the V1 one only up to vLLM 0.33) and dispatches on the constructor
call, so one ``"module:Class"`` name (:data:`NGRAM_PROCESSOR_FQCN`) works whichever
runner vLLM picks. Its V1 path is the
:class:`NGramBlocker` bookkeeping; its V2 path bans the same tokens with a few batched
tensor operations on the device (no host sync without speculative decoding). All of that
logic lives in plain functions taking objects shaped like vLLM's, so it is tested on a
CPU without vLLM; the class is built on first use. Which runner vLLM will pick is
:mod:`srdata.backends.vllm_runner`'s business.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from srdata.backends.vllm_runner import INSTALL_HINT, V2_ONLY_SINCE, parse_version

# Key of the per-request argument read by the n-gram logits processor.
NGRAM_ARG = "srdata_no_repeat_ngram_size"
# vLLM loads custom logits processors by "<module>:<class>", in the frontend (to validate
# requests) and in every worker.
NGRAM_PROCESSOR_FQCN = f"{__name__}:NoRepeatNGramLogitsProcessor"


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
def v1_runner_removed() -> bool:
    """Whether the installed vLLM has no V1 runner (>= 0.34), hence no V1 logits-processor base."""
    import vllm

    return parse_version(vllm.__version__) >= V2_ONLY_SINCE


def _build_processor_class() -> type:
    """Define the processor against the installed vLLM (both runner bases where available)."""
    import numpy as np
    import torch

    try:  # vLLM >= 0.31
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor
    except ImportError:
        V2LogitsProcessor = None
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
    except ImportError:
        if V2LogitsProcessor is None or not v1_runner_removed():
            raise  # a vLLM with a V1 runner must load its base: a partial install
        V1LogitsProcessor = None  # vLLM >= 0.34: no V1 runner, no V1 base
    bases = tuple(base for base in (V1LogitsProcessor, V2LogitsProcessor) if base is not None)

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
