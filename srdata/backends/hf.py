"""Transformers/torch backend: the CPU default, and CUDA when present.

* ``score`` runs one teacher-forced forward pass per length bucket (right padding, so
  positions are exactly those of an unpadded pass) and computes the cross-entropy from
  the final hidden states *at the reference positions only*, projecting them through the
  output layer a chunk of tokens at a time. The full ``batch x sequence x vocabulary``
  float32 logits tensor is never built.
* ``generate`` runs greedy ``model.generate`` per length bucket with left padding and an
  attention mask, under a token budget.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from srdata.backends.base import Backend, Generation, GenerationParams, ProgressCallback, ReferenceScores, Rows, check_pairs
from srdata.backends.attention import use_grouped_decode_attention
from srdata.backends.batching import bucket_batches, prefill_chunks, similar_length_groups
from srdata.backends.decode import greedy_decode
from srdata.backends.packed import use_packed_linears
from srdata.backends.prefill_check import float32_copy, shared_prefill_tolerance
from srdata.backends.live import BackendInterrupted, LiveBatch, decode_watcher

if TYPE_CHECKING:
    from srdata.config import ScoreConfig

log = logging.getLogger(__name__)

# The dtype rule lives in dtype.py; imported here too, where srd_distill and older code look for it.
from srdata.backends.dtype import DTYPES, resolve_device, resolve_dtype  # noqa: E402,F401


def cache_keyword(model: Any) -> str:
    """The keyword under which this transformers version takes a KV cache object.

    transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old name warns with a
    FutureWarning and goes away in 5.40), and older releases know only the old one.

    Example:
        >>> cache_keyword(model)  # doctest: +SKIP
        'cache'
    """
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFBackend(Backend):
    """Generate and score with a ``transformers`` causal LM.

    ``score``, ``context_length`` (the model's positions) and ``close`` (nothing to shut
    down) are the protocol's (:class:`srdata.backends.base.Backend`).

    Example:
        >>> backend = HFBackend.from_pretrained("path/to/student", device="cpu")  # doctest: +SKIP
        >>> backend.score([[5, 6, 7]], [[8, 2]])                                    # doctest: +SKIP
        [6.2]
    """

    packages = ("torch", "transformers")

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        token_budget: int = 16384,
        ce_chunk_tokens: int = 1024,
        prefill_chunk_tokens: int = 4096,
        pack_linears: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.ce_chunk_tokens = ce_chunk_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # Padding ids are masked out, so any id works when the tokenizer has no pad token.
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.cache_kwarg = cache_keyword(model)
        # Greedy answers are the plain argmax (as the vLLM backend's requests, and srdata's own decode loop):
        # generate() would add the model's own defaults, such as a repetition penalty in generation_config.json.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig()
        use_grouped_decode_attention(model)  # no KV-cache copy per decode step (see attention.py)
        if pack_linears:  # CPU: weights reordered once, not per call, where exact (see packed.py)
            use_packed_linears(model, batch_size)
        self.hidden_state_ce = self._hidden_state_ce_matches_logits()
        self.shared_prefill: bool | None = None  # checked on first use (see _shared_prefill_matches)

    @classmethod
    def from_config(cls, config: ScoreConfig, tokenizer: Any = None) -> "HFBackend":
        """The backend for a scoring run: the student, device and dtype, batch sizes from ``config``."""
        m, batching = config.model, config.batching
        return cls.from_pretrained(
            m.path, device=m.device, dtype=m.dtype, tokenizer=tokenizer, batch_size=batching.batch_size, token_budget=batching.token_budget
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "auto", dtype: str = "auto", tokenizer: Any = None, **options: Any
    ) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_device = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, torch_device))
        model.to(torch_device)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, **options)

    # ------------------------------------------------------------------ scoring
    def score_top_k(self, prompt_ids: Rows, reference_ids: Rows, top_k: int, progress: ProgressCallback = None) -> list[ReferenceScores]:
        """Mean NLL of each reference and, with ``top_k > 0``, the top-K log-probs at each of its positions.

        Example:
            >>> scores = backend.score_top_k([[5, 6, 7]], [[8, 2]], top_k=4)   # doctest: +SKIP
            >>> scores[0].top_ids.shape
            (2, 4)
        """
        check_pairs(prompt_ids, reference_ids)
        for i, ref in enumerate(reference_ids):
            if not ref:
                raise ValueError(f"reference {i} has no tokens; it must at least hold the end-of-sequence id")
        if top_k:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            if not 0 < top_k <= vocab:
                raise ValueError(f"top_k must be between 0 and the vocabulary size {vocab}, got {top_k}")
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, reference_ids)]
        results: list[ReferenceScores | None] = [None] * len(lengths)
        for batch in bucket_batches(lengths, self.batch_size, self.token_budget):
            try:
                batch_scores = self._score_batch([prompt_ids[i] for i in batch], [reference_ids[i] for i in batch], top_k)
                for i, scores in zip(batch, batch_scores):
                    results[i] = scores
                if progress:
                    progress(len(batch), sum(lengths[i] for i in batch))
            except KeyboardInterrupt:  # keep the rows of the finished batches
                raise LiveBatch(None).interrupted(batch, self._decode, [r and r.nll for r in results], []) from None
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, prompts: list[list[int]], references: list[list[int]], top_k: int = 0) -> list[ReferenceScores]:
        sequences = [p + r for p, r in zip(prompts, references)]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        rows, positions, targets = [], [], []
        for row, (prompt, reference) in enumerate(zip(prompts, references)):
            seq = prompt + reference
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
            # The hidden state at position t predicts token t + 1.
            start = len(prompt) - 1
            rows += [row] * len(reference)
            positions += range(start, start + len(reference))
            targets += reference
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        rows_t = torch.tensor(rows, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)

        if self.hidden_state_ce:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            nll, top_ids, top_logprobs = self._chunked_nll(hidden[rows_t, positions_t], targets_t, project=True, top_k=top_k)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            nll, top_ids, top_logprobs = self._chunked_nll(logits[rows_t, positions_t], targets_t, project=False, top_k=top_k)

        totals = torch.zeros(len(sequences), dtype=torch.float64, device=self.device)
        totals.index_add_(0, rows_t, nll.to(torch.float64))
        counts = torch.tensor([len(r) for r in references], dtype=torch.float64, device=self.device)
        means = (totals / counts).tolist()
        if not top_k:
            return [ReferenceScores(mean) for mean in means]
        split = list(itertools.accumulate(len(r) for r in references))[:-1]  # each row's slice of the flat positions
        ids_np, logprobs_np = top_ids.to(torch.int32).cpu().numpy(), top_logprobs.cpu().numpy()
        return [ReferenceScores(*row) for row in zip(means, np.split(ids_np, split), np.split(logprobs_np, split))]

    def _chunked_nll(
        self, states: torch.Tensor, targets: torch.Tensor, project: bool, top_k: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token NLL (and the top-K log-probs), upcasting to float32 one chunk of tokens at a time."""
        head = self.model.get_output_embeddings()
        nll, ids, logprobs = [], [], []
        for start in range(0, states.shape[0], self.ce_chunk_tokens):
            chunk = states[start : start + self.ce_chunk_tokens]
            logits = (head(chunk) if project else chunk).float()
            chunk_targets = targets[start : start + self.ce_chunk_tokens]
            normaliser = torch.logsumexp(logits, dim=-1)
            nll.append(normaliser - logits.gather(1, chunk_targets[:, None])[:, 0])
            if top_k:
                values, indices = logits.topk(top_k, dim=-1)  # sorted, highest first
                ids.append(indices)
                logprobs.append(values - normaliser[:, None])
        if not nll:
            return torch.zeros(0, device=states.device), None, None
        return torch.cat(nll), (torch.cat(ids) if top_k else None), (torch.cat(logprobs) if top_k else None)

    @torch.inference_mode()
    def _hidden_state_ce_matches_logits(self) -> bool:
        """Check once that ``lm_head(base_model(x))`` reproduces ``model(x).logits``.

        Some architectures post-process logits (soft-capping, scaling); for those the
        backend falls back to the model's own logits at the reference positions.
        """
        try:
            ids = torch.arange(1, 9, device=self.device)[None] % self.model.config.vocab_size
            expected = self.model(input_ids=ids).logits.float()
            hidden = self.model.base_model(input_ids=ids).last_hidden_state
            got = self.model.get_output_embeddings()(hidden).float()
            ok = torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
        except Exception as err:  # an unusual model layout: use the generic path
            log.info("hidden-state cross-entropy unavailable (%s); using full logits", err)
            return False
        if not ok:
            log.info("model post-processes its logits; cross-entropy uses the model's own logits")
        return ok

    # ------------------------------------------------------------------ both
    def score_and_generate(
        self, prompt_ids: Rows, reference_ids: Rows, params: GenerationParams, progress: ProgressCallback = None
    ) -> tuple[list[float], list[Generation]]:
        """Cross-entropy of every reference and a greedy answer to every prompt, in input order.

        Each prompt is run through the model once: its key/value cache serves both the
        teacher-forced reference (scored as a continuation of the cache) and generation
        (which starts from the same cache). Separate :meth:`score` and :meth:`generate`
        calls would run every prompt twice, and prompts are most of the tokens SRD sees.
        Models whose cache cannot be shared this way (checked once, see
        :meth:`_shared_prefill_matches`) get the two separate passes.

        Example:
            >>> losses, answers = backend.score_and_generate([[5, 6, 7]], [[8, 2]], GenerationParams(16))  # doctest: +SKIP
        """
        check_pairs(prompt_ids, reference_ids)
        for i, ref in enumerate(reference_ids):
            if not ref:
                raise ValueError(f"reference {i} has no tokens; it must at least hold the end-of-sequence id")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if self.shared_prefill is None:
            self.shared_prefill = self._shared_prefill_matches()
        if not self.shared_prefill:
            losses = self.score(prompt_ids, reference_ids, progress)
            try:
                return losses, self.generate(prompt_ids, params, progress)
            except BackendInterrupted as stop:  # every loss is known: the rows generated are finished
                raise BackendInterrupted(dict(enumerate(losses)), stop.generations) from None
        lengths = [len(p) for p in prompt_ids]
        losses: list[float] = [float("nan")] * len(lengths)
        results: list[Generation | None] = [None] * len(lengths)
        # Batched by prompt length, as generate(): the prompt's padding is paid at every step.
        for batch in bucket_batches(lengths, self.batch_size, self.token_budget, extra=params.max_new_tokens):
            live = LiveBatch(progress)
            try:
                batch_losses, generations = self._prefill_score_generate(
                    [prompt_ids[i] for i in batch], [reference_ids[i] for i in batch], params, live
                )
                for k, i in enumerate(batch):
                    losses[i], results[i] = batch_losses[k], generations[k]
                live.finish(len(batch), sum(lengths[i] + len(reference_ids[i]) + len(results[i].token_ids) for i in batch))
            except KeyboardInterrupt:  # keep earlier batches' rows and this batch's rows that stopped
                raise live.interrupted(batch, self._decode, losses, results) from None
        return losses, results  # type: ignore[return-value]

    @torch.inference_mode()
    def _prefill_score_generate(
        self, prompts: list[list[int]], references: list[list[int]], params: GenerationParams, live: LiveBatch | None = None
    ) -> tuple[list[float], list[Generation]]:
        input_ids, attention_mask = self._left_padded(prompts)
        width = input_ids.shape[1]
        if width < 2:  # nothing to cache before the last prompt token
            return [r.nll for r in self._score_batch(prompts, references)], self._generate_batch(prompts, params, live=live)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._prefill(input_ids, attention_mask, positions, width + params.max_new_tokens)
        losses = [float("nan")] * len(prompts)
        for group in similar_length_groups([len(r) for r in references]):
            group_losses = self._score_continuation(
                cache, group, input_ids, attention_mask, positions, references
            )
            for row, loss in zip(group, group_losses):
                losses[row] = loss
        if live is not None:  # prompts and references are done: show it before decoding starts
            live.losses = losses
            live.add(sum(len(p) + len(r) for p, r in zip(prompts, references)))
        answers = greedy_decode(self.model, cache, input_ids, attention_mask, positions, params, live, self.cache_kwarg)
        return losses, [Generation(ids, self._decode(ids), "stop" if stopped else "length") for ids, stopped in answers]

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, max_cache_len: int
    ) -> Any:
        """A KV cache holding every prompt token but the last, room left for ``max_cache_len``.

        generate() runs the last prompt token itself (its logits pick the first answer
        token), and scoring feeds it as the continuation's first token, whose output
        predicts the first reference token. The cache is preallocated (StaticCache), so
        generation writes each step in place; a growing DynamicCache copies the whole
        cache at every step (61% of decode time, measured on CPU). Prompts run in chunks
        of about ``prefill_chunk_tokens``: decoding wants many rows per step, but one
        forward over all of them is slower per token (activations fall out of the caches).
        Each chunk groups rows of similar length and runs at its own width (prompts are
        left padded, so its tokens are the batch's last columns); the columns left of it
        stay zero and masked.
        """
        from transformers import DynamicCache, StaticCache

        rows, width = input_ids.shape[0], input_ids.shape[1] - 1
        lengths = attention_mask[:, :-1].sum(-1).tolist()
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for chunk in prefill_chunks(lengths, self.prefill_chunk_tokens):
            chunk_width = max(lengths[r] for r in chunk)
            if chunk_width == 0:  # one-token prompts: nothing to cache
                continue
            index, columns = torch.tensor(chunk, device=self.device), slice(width - chunk_width, width)
            chunk_cache = DynamicCache(config=self.model.config)
            self.model.base_model(
                input_ids=input_ids[index, columns], attention_mask=attention_mask[index, columns],
                position_ids=positions[index, columns], **{self.cache_kwarg: chunk_cache}, use_cache=True,
            )
            for layer_idx, layer in enumerate(chunk_cache.layers):
                if len(keys) <= layer_idx:  # [rows, heads, width, head_dim], zero where nothing is cached
                    keys.append(layer.keys.new_zeros((rows, layer.keys.shape[1], width, layer.keys.shape[3])))
                    values.append(layer.values.new_zeros((rows, layer.values.shape[1], width, layer.values.shape[3])))
                keys[layer_idx][index, :, columns] = layer.keys
                values[layer_idx][index, :, columns] = layer.values
        cache = StaticCache(config=self.model.config, max_cache_len=max_cache_len)
        for layer_idx, (layer_keys, layer_values) in enumerate(zip(keys, values)):
            cache.update(layer_keys, layer_values, layer_idx)
        return cache

    def _score_continuation(
        self, cache: Any, rows: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor,
        positions: torch.Tensor, references: list[list[int]],
    ) -> list[float]:
        """Mean NLL of the references of ``rows``, run on a copy of their slice of the prompt cache."""
        from transformers import DynamicCache

        index = torch.tensor(rows, device=self.device)
        # Indexing copies the slices, and the forward below appends to the copy only, so
        # the prompt cache stays intact for generation.
        group_cache = DynamicCache(
            ddp_cache_data=[
                (layer.keys[index, :, : input_ids.shape[1] - 1], layer.values[index, :, : input_ids.shape[1] - 1])
                for layer in cache.layers
            ],
            config=self.model.config,
        )
        refs = [references[r] for r in rows]
        width = max(len(r) for r in refs)
        # Continuation = last prompt token + reference minus its last token, right padded:
        # the output at step j predicts reference token j.
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.long)
        for k, ref in enumerate(refs):
            tokens[k, 0] = input_ids[rows[k], -1]
            tokens[k, 1 : len(ref)] = torch.tensor(ref[:-1], dtype=torch.long)
            valid[k, : len(ref)] = 1
        tokens, valid = tokens.to(self.device), valid.to(self.device)
        mask = torch.cat([attention_mask[index, :-1], valid], dim=1)
        steps = positions[index, -1:] + torch.arange(width, device=self.device)
        group_rows = torch.cat([torch.full((len(ref),), k, device=self.device) for k, ref in enumerate(refs)])
        group_positions = torch.cat([torch.arange(len(ref), device=self.device) for ref in refs])
        targets = torch.tensor([t for ref in refs for t in ref], device=self.device)
        if self.hidden_state_ce:
            hidden = self.model.base_model(
                input_ids=tokens, attention_mask=mask, position_ids=steps, **{self.cache_kwarg: group_cache}, use_cache=True
            ).last_hidden_state
            nll = self._chunked_nll(hidden[group_rows, group_positions], targets, project=True)[0]
        else:
            logits = self.model(
                input_ids=tokens, attention_mask=mask, position_ids=steps, **{self.cache_kwarg: group_cache}, use_cache=True
            ).logits
            nll = self._chunked_nll(logits[group_rows, group_positions], targets, project=False)[0]
        totals = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        totals.index_add_(0, group_rows, nll.to(torch.float64))
        counts = torch.tensor([len(r) for r in refs], dtype=torch.float64, device=self.device)
        return (totals / counts).tolist()

    @torch.inference_mode()
    def _shared_prefill_matches(self) -> bool:
        """Check once, on two made-up rows, that the shared prompt cache gives the separate passes' results.

        Models with caches that cannot be sliced or continued this way (sliding-window or
        recurrent layers, custom cache classes) fail the check and use separate passes.
        """
        vocab = self.model.config.vocab_size
        prompts = [[(7 * i + 3) % vocab for i in range(1, 10)], [(5 * i + 1) % vocab for i in range(1, 5)]]
        references = [[(3 * i + 2) % vocab for i in range(1, 4)], [(11 * i) % vocab for i in range(1, 7)]]
        params = GenerationParams(max_new_tokens=4)
        try:
            shared_losses, shared_outputs = self._prefill_score_generate(prompts, references, params)
        except Exception as err:  # an unusual cache layout: use the separate passes
            log.info("shared prompt prefill unavailable (%s); scoring and generating separately", err)
            return False
        losses, outputs = [r.nll for r in self._score_batch(prompts, references)], self._generate_batch(prompts, params)
        dtype = next(self.model.parameters()).dtype
        ok = all(abs(a - b) <= shared_prefill_tolerance(dtype) * max(1.0, abs(b)) for a, b in zip(shared_losses, losses)) and [
            g.token_ids for g in shared_outputs
        ] == [g.token_ids for g in outputs]
        if ok and shared_prefill_tolerance(dtype) > shared_prefill_tolerance(torch.float32):
            # 16-bit rounding hides an off-by-one position: check the same code on exact float32 weights too.
            twin = float32_copy(self.model)
            if twin is not None:
                log.info("checking the shared prompt prefill on a float32 copy of the %s weights", dtype)
                twin_backend = type(self)(  # packing is exact (packed.py) and would cost another copy here
                    twin, self.tokenizer, batch_size=self.batch_size, token_budget=self.token_budget, pack_linears=False
                )
                ok = twin_backend._shared_prefill_matches()
                del twin_backend, twin
        if not ok:
            log.info("shared prompt prefill disagrees with separate passes for this model; scoring and generating separately")
        return ok

    # --------------------------------------------------------------- generation
    def generate(
        self, prompt_ids: Sequence[list[int]], params: GenerationParams, progress: ProgressCallback = None
    ) -> list[Generation]:
        """Greedy answers for every prompt, in input order."""
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        lengths = [len(p) for p in prompt_ids]
        results: list[Generation | None] = [None] * len(lengths)
        for batch in bucket_batches(lengths, self.batch_size, self.token_budget, extra=params.max_new_tokens):
            live = LiveBatch(progress)
            live.losses = [0.0] * len(batch)  # generation only: a stopped row is finished
            try:
                generations = self._generate_batch([prompt_ids[i] for i in batch], params, live=live)
                for i, generation in zip(batch, generations):
                    results[i] = generation
                live.finish(len(batch), sum(lengths[i] + len(results[i].token_ids) for i in batch))
            except KeyboardInterrupt:
                raise live.interrupted(batch, self._decode, [], results) from None
        return results  # type: ignore[return-value]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts left padded (every prompt ends at the same column) and their attention mask, on the device."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], params: GenerationParams, cache: Any = None, live: LiveBatch | None = None
    ) -> list[Generation]:
        """Greedy answers for one batch; ``cache`` may hold every prompt token but the last."""
        from transformers import GenerationConfig, StoppingCriteriaList

        input_ids, attention_mask = self._left_padded(prompts)
        width = input_ids.shape[1]
        stop_ids = list(params.stop_token_ids)
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=params.max_new_tokens,
            no_repeat_ngram_size=params.no_repeat_ngram_size or 0,
            eos_token_id=stop_ids or None,
            pad_token_id=self.pad_id,
        )
        watchers = StoppingCriteriaList([decode_watcher(live, stop_ids, width)] if live is not None else [])
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **{self.cache_kwarg: cache}, generation_config=config,
            stopping_criteria=watchers,
        )
        generations = []
        for row in output[:, width:].tolist():
            stop_at = next((i for i, t in enumerate(row) if t in stop_ids), None)
            ids = row if stop_at is None else row[:stop_at]
            generations.append(Generation(ids, self._decode(ids), "length" if stop_at is None else "stop"))
        return generations

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

