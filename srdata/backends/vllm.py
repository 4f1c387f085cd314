"""vLLM backend: teacher-forced scoring and greedy generation through one engine.

Per batch of rows the work is done in two passes over the same engine:

1. **Scoring.** One request per row whose prompt is ``prompt_ids + reference_ids``,
   with ``max_tokens=1`` and detokenisation off (:mod:`srdata.backends.vllm_scoring`).
   Where the engine can (vLLM >= 0.32 on Model Runner V2, decided when it starts) the
   request asks for the reference rows alone (``prompt_logprob_token_ids``); elsewhere
   for every prompt position (``prompt_logprobs=0``). Each output is reduced at once to
   the mean NLL over the reference positions and dropped. A scoring request never
   *reads* the prefix cache (``skip_reading_prefix_cache``: cached positions have no
   logits) but it does *write* the blocks it computes.
2. **Generation.** Greedy (``temperature=0``) requests on ``prompt_ids`` alone, with the
   caller's stop ids and ``max_tokens``. Their prompts are prefixes of the scoring
   requests, so the full KV blocks written in pass 1 are served from the prefix cache.

Design choices (see the README section "vLLM backend"):

* Token ids in, token ids out: the engine is built with ``skip_tokenizer_init=True`` and
  every request has ``detokenize=False``; answers are decoded here with the same
  tokenizer, and the same call, as the transformers backend.
* ``no_repeat_ngram_size`` has no vLLM sampling parameter: it is a vLLM custom logits
  processor (:mod:`srdata.backends.vllm_ngram`), registered when the engine is built with
  ``no_repeat_ngram_size=N``; the bans are exactly those of transformers'
  ``NoRepeatNGramLogitsProcessor`` (n-grams over prompt + output).
* The engine's arguments, device check, start errors and log filtering are in
  :mod:`srdata.backends.vllm_engine`; which model runner vLLM picks, and the memory its
  prompt log-probs need, in :mod:`srdata.backends.vllm_runner`.

The request-building and output-reduction logic is in plain functions that take objects
shaped like vLLM's, so it is tested on a CPU without vLLM.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from srdata.backends.base import Backend, Generation, GenerationParams, ProgressCallback, ReferenceScores, Rows, check_pairs
from srdata.backends.live import BackendInterrupted
from srdata.backends.vllm_engine import (
    check_vllm_device,
    engine_kwargs,
    engine_start_error,
    install_noise_filter,
    is_engine_start_failure,
    quiet_vllm_info,
    require_vllm,
    scoring_step_tokens,
    vllm_runs_on_cpu,
)
from srdata.backends.vllm_ngram import NGRAM_ARG
from srdata.backends.vllm_runner import (
    ALL_POSITIONS,
    REFERENCE_ROWS,
    check_ngram_processor,
    model_runner_of,
    scoring_path,
    top_k_start_supported,
)
from srdata.backends.vllm_scoring import (  # noqa: F401 - the scoring names are part of this module's API
    mean_reference_nll,
    position_logprob,
    reference_rows_kwargs,
    reference_rows_nll,
    reference_top_k,
    scoring_prompt,
    scoring_sampling_kwargs,
    token_list,
    top_k_kwargs,
)

if TYPE_CHECKING:
    from srdata.config import ScoreConfig

log = logging.getLogger(__name__)
Prompt = dict[str, list[int]]  # a vLLM TokensPrompt


# ------------------------------------------------------------------- request building
def generation_prompt(prompt_ids: Sequence[int]) -> dict[str, list[int]]:
    """The generation request's prompt: the prompt ids alone (a prefix of the scoring request).

    Example:
        >>> generation_prompt([5, 6])
        {'prompt_token_ids': [5, 6]}
    """
    if not prompt_ids:
        raise ValueError("a prompt has no tokens")
    return {"prompt_token_ids": token_list(prompt_ids)}


def generation_sampling_kwargs(params: GenerationParams) -> dict[str, Any]:
    """``SamplingParams`` of a greedy generation request.

    Example:
        >>> generation_sampling_kwargs(GenerationParams(max_new_tokens=8, stop_token_ids=(2,)))["stop_token_ids"]
        [2]
    """
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    kwargs: dict[str, Any] = {
        "temperature": 0.0,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": token_list(params.stop_token_ids),
        "detokenize": False,
    }
    if params.no_repeat_ngram_size:
        kwargs["extra_args"] = {NGRAM_ARG: int(params.no_repeat_ngram_size)}
    return kwargs


# ------------------------------------------------------------------- output reduction
def to_generation(completion: Any, stop_token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> Generation:
    """Convert a vLLM ``CompletionOutput`` to a :class:`Generation`.

    vLLM keeps the stop token at the end of ``token_ids`` (``stop_reason`` is that id, or
    None when the model's own end-of-sequence id stopped it); it is removed here, as the
    transformers backend does. A ``length`` finish whose last token is a stop id counts
    as ``stop``, again as in the transformers backend.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> out = NS(token_ids=[5, 6, 2], finish_reason="stop", stop_reason=2)
        >>> to_generation(out, [2], lambda ids: " ".join(map(str, ids)))
        Generation(token_ids=[5, 6], text='5 6', finish_reason='stop')
    """
    ids = token_list(completion.token_ids)
    finish = completion.finish_reason
    if finish == "stop":
        stop_reason = getattr(completion, "stop_reason", None)
        if isinstance(stop_reason, str):
            raise ValueError(f"generation stopped on the string {stop_reason!r}, but no stop strings are requested")
        if ids and (stop_reason is None or ids[-1] == stop_reason):
            ids = ids[:-1]
        reason = "stop"
    elif finish == "length":
        reason = "length"
        if ids and ids[-1] in set(stop_token_ids):
            ids, reason = ids[:-1], "stop"
    else:
        raise RuntimeError(f"vLLM ended a generation with finish_reason={finish!r}")
    return Generation(ids, decode(ids), reason)


# ---------------------------------------------------------------------------- backend
def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _engine_attr(llm: Any, *path: str) -> Any:
    """Follow ``llm.llm_engine.<path>`` (or ``llm.<path>``); None where a version lacks it."""
    for root in (llm, getattr(llm, "llm_engine", None)):
        obj = root
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


class VLLMBackend(Backend):
    """Generate and score with a vLLM engine (see the module docstring for the design).

    ``score`` is the protocol's (:class:`srdata.backends.base.Backend`), from :meth:`score_top_k`.

    Example:
        >>> backend = VLLMBackend.from_pretrained("path/to/student", max_model_len=1024)  # doctest: +SKIP
        >>> backend.score([[5, 6, 7]], [[8, 2]])                                             # doctest: +SKIP
        [6.2]
    """

    packages = ("torch", "transformers", "vllm")

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        *,
        ngram_processor: bool = False,
        score_chunk_rows: int = 2048,
        generate_chunk_rows: int = 8192,
        sampling_params_cls: Callable[..., Any] | None = None,
        scoring: str = ALL_POSITIONS,
        top_k_from_reference: bool = False,
    ) -> None:
        if score_chunk_rows < 1 or generate_chunk_rows < 1:
            raise ValueError("score_chunk_rows and generate_chunk_rows must be >= 1")
        if scoring not in (REFERENCE_ROWS, ALL_POSITIONS):
            raise ValueError(f"scoring must be {REFERENCE_ROWS!r} or {ALL_POSITIONS!r}, got {scoring!r}")
        # What a scoring request asks for (see srdata.backends.vllm_scoring): the reference rows
        # alone, or every prompt position; and whether a top-K request may skip the prompt rows.
        self.scoring = scoring
        self.top_k_from_reference = top_k_from_reference
        self.llm = llm
        self.tokenizer = tokenizer
        self.ngram_processor = ngram_processor
        # Scoring outputs hold one log-probability per token until reduced: chunks bound that memory.
        self.score_chunk_rows = score_chunk_rows
        # Generation chunks only bound progress granularity; larger ones batch better.
        self.generate_chunk_rows = generate_chunk_rows
        self._sampling_params_cls = sampling_params_cls
        self.max_model_len: int | None = _engine_attr(llm, "model_config", "max_model_len")
        # Prefix-cache reuse seen by generation: prompt tokens and how many came from the cache.
        self.prefix_cache_stats = {"generation_prompt_tokens": 0, "generation_cached_tokens": 0}

    @classmethod
    def from_config(cls, config: ScoreConfig, tokenizer: Any = None) -> "VLLMBackend":
        """The engine for a scoring run: the student and the engine settings from ``config.model``.

        ``--batch-size`` and ``--token-budget`` are not used: vLLM batches by itself.
        """
        m = config.model
        return cls.from_pretrained(
            m.path, tokenizer=tokenizer, dtype=m.dtype, seed=config.run.seed, gpu_memory_utilization=m.gpu_memory_utilization,
            max_model_len=m.max_model_len, max_num_batched_tokens=m.max_num_batched_tokens, tensor_parallel_size=m.tensor_parallel_size,
            # vLLM has no such sampling parameter: the engine registers a logits processor for it.
            no_repeat_ngram_size=config.generation.no_repeat_ngram_size, device=m.device,
        )

    @classmethod
    def context_length(cls, config: ScoreConfig) -> int | None:
        """The model's positions, lowered by ``--max-model-len`` (the engine's context length) when it is set."""
        from srdata.steps.context import model_max_positions  # reads the model's config.json

        return model_max_positions(config.model.path, config.model.max_model_len)

    @classmethod
    def from_pretrained(cls, model: str | Path, *, tokenizer: Any = None, device: str = "auto", **engine: Any) -> "VLLMBackend":
        """Build the engine for ``model`` (a local folder or hub id).

        ``tokenizer`` is a tokenizer object or a path (default: the model's); it decodes
        answers. ``engine`` holds the engine settings of :func:`engine_kwargs` (dtype, seed,
        gpu_memory_utilization, max_model_len, max_num_batched_tokens, tensor_parallel_size,
        no_repeat_ngram_size, enforce_eager, engine_args); an unknown one is a TypeError.
        ``no_repeat_ngram_size`` > 0 registers the n-gram logits processor, which generation
        then needs; ``engine_args`` passes further ``vllm.LLM`` arguments.

        Example:
            >>> backend = VLLMBackend.from_pretrained("path/to/student", max_model_len=2048)  # doctest: +SKIP
        """
        kwargs = engine_kwargs(model, **engine)  # names and values checked before vLLM is imported
        ngram_processor = bool(engine.get("no_repeat_ngram_size"))
        with quiet_vllm_info():  # vLLM configures its logging when first imported
            vllm = require_vllm()
        if ngram_processor:  # before loading anything: a runner that cannot run it fails now
            check_ngram_processor(vllm.__version__)
        if "max_num_batched_tokens" not in kwargs:
            step_tokens = scoring_step_tokens(
                vllm, model, kwargs["dtype"], kwargs["gpu_memory_utilization"], kwargs["tensor_parallel_size"], ngram_processor, engine.get("engine_args")
            )
            if step_tokens is not None:
                kwargs["max_num_batched_tokens"] = step_tokens
        check_vllm_device(device, vllm_runs_on_cpu())
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        install_noise_filter()
        with quiet_vllm_info():
            try:
                llm = vllm.LLM(**kwargs)
            except Exception as err:
                if is_engine_start_failure(err):
                    raise engine_start_error(err, kwargs["gpu_memory_utilization"]) from err
                raise
        config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
        runner = model_runner_of(config, vllm.__version__)
        fast_prefill = bool(getattr(getattr(config, "cache_config", None), "kv_sharing_fast_prefill", False))
        scoring = scoring_path(vllm.__version__, runner, kv_sharing_fast_prefill=fast_prefill)
        backend = cls(
            llm, tokenizer, ngram_processor=ngram_processor, sampling_params_cls=vllm.SamplingParams, scoring=scoring,
            top_k_from_reference=scoring == REFERENCE_ROWS and top_k_start_supported(vllm.__version__),
        )
        backend.check_scoring()
        log.info(
            "vLLM %s, model runner %s (max_num_batched_tokens=%s): scoring requests ask for %s", vllm.__version__, runner,
            kwargs.get("max_num_batched_tokens"),
            "the reference rows alone" if backend.scoring == REFERENCE_ROWS else "every prompt position (prompt_logprobs)",
        )
        return backend

    # ------------------------------------------------------------------ helpers
    def _sampling_params(self, **kwargs: Any) -> Any:
        if self._sampling_params_cls is None:
            self._sampling_params_cls = require_vllm().SamplingParams
        return self._sampling_params_cls(**kwargs)

    def _check_length(self, i: int, tokens: int, what: str) -> None:
        # vLLM rejects a prompt that leaves no room for one token within max_model_len.
        if self.max_model_len is not None and tokens >= self.max_model_len:
            raise ValueError(
                f"row {i}: the {what} has {tokens} tokens, which does not fit max_model_len={self.max_model_len}; "
                "raise --max-model-len (up to the model's context length) or lower the token limits"
            )

    def _run(self, prompts: list[dict[str, list[int]]], sampling_params: Any) -> list[Any]:
        outputs = self.llm.generate(prompts, sampling_params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} requests")
        for prompt, output in zip(prompts, outputs):
            # LLM.generate returns outputs in request order; check it, since a silent
            # misalignment would pair scores with the wrong rows.
            got = getattr(output, "prompt_token_ids", None)
            if got is not None and list(got) != prompt["prompt_token_ids"]:
                raise RuntimeError("vLLM returned outputs out of request order")
        return outputs

    # ------------------------------------------------------------------ scoring
    def check_scoring(self) -> None:
        """Score one 2-token request the :attr:`scoring` way; fall back to every prompt position if refused.

        The choice made from vLLM's version and runner is checked against the engine
        itself, so an engine that refuses ``prompt_logprob_token_ids`` (or answers without
        ``prompt_token_id_logprobs``) costs one warning at start, not a failed run.
        """
        if self.scoring != REFERENCE_ROWS:
            return
        try:
            [output] = self._run([scoring_prompt([0], [0])], [self._sampling_params(**reference_rows_kwargs(1, [0]))])
            reference_rows_nll(getattr(output, "prompt_token_id_logprobs", None), [0])
        except Exception as err:  # noqa: BLE001 - whatever the refusal, the other path is correct
            log.warning("vLLM does not score reference rows on this engine (%s): scoring every prompt position", err)
            self.scoring, self.top_k_from_reference = ALL_POSITIONS, False

    def score_top_k(self, prompt_ids: Rows, reference_ids: Rows, top_k: int, progress: ProgressCallback = None) -> list[ReferenceScores]:
        """Mean NLL of each reference and, with ``top_k > 0``, the top-K log-probs at each of its positions."""
        check_pairs(prompt_ids, reference_ids)
        results: list[ReferenceScores] = []
        for rows in _chunks(len(prompt_ids), self.score_chunk_rows):
            prompts = [scoring_prompt(prompt_ids[i], reference_ids[i]) for i in rows]
            for i, prompt in zip(rows, prompts):
                self._check_length(i, len(prompt["prompt_token_ids"]), "prompt + reference")
            if top_k == 0 and self.scoring == REFERENCE_ROWS:
                nlls = self._reference_rows_nlls(rows, prompts, prompt_ids, reference_ids)
                results += [ReferenceScores(nll) for nll in nlls]
            else:
                results += self._all_positions_scores(rows, prompts, prompt_ids, reference_ids, top_k)
            # the per-token log-probabilities are not kept beyond this chunk
            if progress:
                progress(len(rows), sum(len(p["prompt_token_ids"]) for p in prompts))
        return results

    def _reference_rows_nlls(self, rows: range, prompts: list[Prompt], prompt_ids: Rows, reference_ids: Rows) -> list[float]:
        params = [self._sampling_params(**reference_rows_kwargs(len(prompt_ids[i]), reference_ids[i])) for i in rows]
        answers = [getattr(output, "prompt_token_id_logprobs", None) for output in self._run(prompts, params)]
        nlls = [None if a is None else reference_rows_nll(a, reference_ids[i]) for a, i in zip(answers, rows)]
        missing = [k for k, nll in enumerate(nlls) if nll is None]
        if missing:
            # vLLM drops the scores of a request whose prefill began past its first scored row
            # (e.g. a prefix-cache read): such rows are scored again over every position.
            log.warning("vLLM answered %d of %d reference-rows requests without scores: rescoring them", len(missing), len(rows))
            redo = [rows[k] for k in missing]
            again = self._all_positions_scores(
                range(len(redo)), [prompts[k] for k in missing], [prompt_ids[i] for i in redo], [reference_ids[i] for i in redo], 0
            )
            for k, scores in zip(missing, again):
                nlls[k] = scores.nll
        return nlls  # type: ignore[return-value]

    def _all_positions_scores(
        self, rows: range, prompts: list[Prompt], prompt_ids: Rows, reference_ids: Rows, top_k: int
    ) -> list[ReferenceScores]:
        if self.top_k_from_reference and top_k:  # one start per row: one SamplingParams per row
            params: Any = [self._sampling_params(**top_k_kwargs(len(prompt_ids[i]), top_k, True)) for i in rows]
        else:
            params = self._sampling_params(**top_k_kwargs(0, top_k, False))
        results = []
        for i, output in zip(rows, self._run(prompts, params)):
            lps, n_prompt = output.prompt_logprobs, len(prompt_ids[i])
            top = reference_top_k(lps, n_prompt, reference_ids[i], top_k) if top_k else (None, None)
            results.append(ReferenceScores(mean_reference_nll(lps, n_prompt, reference_ids[i]), *top))
        return results

    # --------------------------------------------------------------- generation
    def generate(self, prompt_ids: Rows, params: GenerationParams, progress: ProgressCallback = None) -> list[Generation]:
        """Greedy answers for every prompt, in input order."""
        if params.no_repeat_ngram_size and not self.ngram_processor:
            raise ValueError(
                "no_repeat_ngram_size needs the n-gram logits processor, which is registered when the engine "
                f"is built: pass no_repeat_ngram_size={params.no_repeat_ngram_size} to VLLMBackend.from_pretrained (--no-repeat-ngram-size)"
            )
        sampling_params = self._sampling_params(**generation_sampling_kwargs(params))
        results: list[Generation] = []
        for rows in _chunks(len(prompt_ids), self.generate_chunk_rows):
            prompts = []
            for i in rows:
                prompts.append(generation_prompt(prompt_ids[i]))
                self._check_length(i, len(prompt_ids[i]), "prompt")
            outputs = self._run(prompts, sampling_params)
            generated = 0
            for prompt, output in zip(prompts, outputs):
                generation = to_generation(output.outputs[0], params.stop_token_ids, self._decode)
                results.append(generation)
                generated += len(generation.token_ids)
                self.prefix_cache_stats["generation_prompt_tokens"] += len(prompt["prompt_token_ids"])
                self.prefix_cache_stats["generation_cached_tokens"] += int(getattr(output, "num_cached_tokens", 0) or 0)
            if progress:
                progress(len(rows), sum(len(p["prompt_token_ids"]) for p in prompts) + generated)
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ both
    def score_and_generate(
        self, prompt_ids: Rows, reference_ids: Rows, params: GenerationParams, progress: ProgressCallback = None, *, window_tokens: int | None = None
    ) -> tuple[list[float], list[Generation]]:
        """Score, then generate, window by window, so each window's prompts are still cached.

        The prefix cache evicts least-recently-used blocks; when the scoring pass of a
        large batch writes more blocks than the KV cache holds, the first prompts are gone
        before generation reaches them. Windows of at most ``window_tokens`` scored
        tokens (default: half the KV cache, when the engine reports its size; else the
        whole batch) keep the reuse.
        """
        check_pairs(prompt_ids, reference_ids)
        budget = window_tokens or self.kv_cache_tokens() // 2 or None
        losses: list[float] = []
        generations: list[Generation] = []
        try:
            for window in token_windows([len(p) + len(r) for p, r in zip(prompt_ids, reference_ids)], budget):
                prompts = [prompt_ids[i] for i in window]
                losses += self.score(prompts, [reference_ids[i] for i in window], progress)
                generations += self.generate(prompts, params, progress)
        except KeyboardInterrupt:  # Ctrl-C: the finished windows' rows are kept (srdata.backends.live)
            raise BackendInterrupted(dict(enumerate(losses[: len(generations)])), dict(enumerate(generations))) from None
        return losses, generations

    def kv_cache_tokens(self) -> int:
        """KV cache capacity in tokens as the engine reports it, or 0 when it does not."""
        blocks = _engine_attr(self.llm, "vllm_config", "cache_config", "num_gpu_blocks")
        block_size = _engine_attr(self.llm, "vllm_config", "cache_config", "block_size")
        return int(blocks) * int(block_size) if blocks and block_size else 0

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (best effort across vLLM versions)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine_core = _engine_attr(llm, "engine_core")
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def token_windows(lengths: Sequence[int], budget: int | None) -> list[range]:
    """Consecutive row ranges whose token counts sum to at most ``budget`` (one range if None).

    A row longer than the budget gets a window of its own.

    Example:
        >>> token_windows([3, 3, 3, 9, 1], budget=6)
        [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    """
    if budget is None or not lengths:
        return [range(0, len(lengths))] if lengths else []
    windows, start, used = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and used + length > budget:
            windows.append(range(start, i))
            start, used = i, 0
        used += length
    windows.append(range(start, len(lengths)))
    return windows
