"""Tiny random-weight causal LMs with a tokenizer trained on the spot.

Used by the offline demo, the tests and the benchmarks: nothing is downloaded. The model
and tokenizer are saved with ``save_pretrained`` and must be loaded back through the
normal ``from_pretrained`` path, exactly as a real student would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal

Architecture = Literal["gpt2", "llama", "qwen2"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, add_bos: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a HF fast tokenizer.

    ``add_bos=True`` makes it prepend ``<s>`` to every encoded text (Llama style).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_tiny_model(
    path: str | Path,
    texts: Iterable[str],
    arch: Architecture = "gpt2",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
    pad_token: bool = True,
) -> Path:
    """Save a random-weight causal LM and its freshly trained tokenizer under ``path``.

    ``pad_token=False`` removes the pad token, to exercise tokenizers without one.

    Example:
        >>> build_tiny_model("/tmp/tiny", ["hello world"] * 10, arch="llama")  # doctest: +SKIP
        PosixPath('/tmp/tiny')
    """
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    path = Path(path)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, add_bos=arch == "llama")
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_token else None,
    )
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **ids)
    elif arch in ("llama", "qwen2"):
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = config_cls(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=arch == "qwen2",
            **ids,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; use one of gpt2, llama, qwen2")
    pad_id = ids["pad_token_id"]
    if not pad_token:
        tokenizer.pad_token = None
    return _save_random_model(path, config, tokenizer, seed, pad_token_id=pad_id)


def _save_random_model(
    path: Path, config: Any, tokenizer: Any, seed: int, *, dtype: str = "float32", pad_token_id: int | None = None
) -> Path:
    """Seeded random weights for ``config``, saved with ``tokenizer`` under ``path``; returns ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_qwen2_05b_layout(path: str | Path, texts: Iterable[str], *, vocab_size: int = 32_000, seed: int = 0, dtype: str = "float32") -> Path:
    """Save a random-weight Qwen2 with the 0.5B layout (896 hidden, 24 layers) and a tokenizer trained on ``texts``.

    For GPU checks, where a real architecture's size matters but nothing can be downloaded.
    """
    from transformers import Qwen2Config

    path = Path(path)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_random_model(path, config, tokenizer, seed, dtype=dtype)


# --------------------------------------------------------------------------------------
# Character-level models for the controlled testbed (srdata.demo.testbed)
# --------------------------------------------------------------------------------------


def build_char_model(
    path: str | Path,
    arch: Architecture = "gpt2",
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
) -> Path:
    """Save a random-weight causal LM with the testbed's character-level tokenizer under ``path``.

    Example:
        >>> build_char_model("/tmp/char-student", hidden_size=64, num_layers=2)   # doctest: +SKIP
        PosixPath('/tmp/char-student')
    """
    from transformers import GPT2Config, LlamaConfig

    from srdata.demo.testbed import char_tokenizer

    path = Path(path)
    tokenizer = char_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    elif arch == "llama":
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 4, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, num_key_value_heads=num_heads,
                             max_position_embeddings=max_positions, **ids)
    else:
        raise ValueError(f"unknown architecture {arch!r} for a character model; use gpt2 or llama")
    return _save_random_model(path, config, tokenizer, seed)


def train_on_pairs(
    path: str | Path,
    prompts: list[str],
    responses: list[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
    seed: int = 0,
    log_every: int = 0,
    echo=print,
    callback=None,
) -> list[float]:
    """Supervised fine-tuning of the saved model at ``path`` on prompt/response pairs; saved back.

    The loss is the cross-entropy of the response tokens and the end-of-sequence token
    (prompt tokens are not scored), with the tokenization of :func:`srdata.encode_pairs`.
    Batches are drawn by a shuffled pass over the pairs, repeated as needed; each step is
    ``srd-distill``'s (:mod:`srd_distill.step`: AdamW without decay on biases and norm gains,
    linear warm-up and cosine decay, gradient norm clipped at 1). Returns the mean training
    loss of every ``log_every`` steps (empty when ``log_every`` is 0). ``callback(step,
    model)``, when given, is called after each logged step (e.g. to evaluate).

    Example:
        >>> train_on_pairs("/tmp/char-student", ["copy a b\\n"], ["a b"], steps=10)   # doctest: +SKIP
        []
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srd_distill.step import learning_rate, make_optimizer, optimizer_step  # the training step srd-distill uses
    from srdata.steps.tokenize import encode_pairs

    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (and at least one), got {len(prompts)} and {len(responses)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    pairs = encode_pairs(tokenizer, prompts, responses, max_prompt_tokens=10_000, max_reference_tokens=None)
    sequences = [(p.prompt_ids + p.reference_ids, len(p.prompt_ids)) for p in pairs]
    optimizer = make_optimizer(model, lr, weight_decay, device=torch.device("cpu"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order: list[int] = []
    history: list[float] = []
    window: list[float] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(sequences), generator=generator).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        width = max(len(sequences[i][0]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            seq, prompt_length = sequences[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, prompt_length : len(seq)] = torch.tensor(seq[prompt_length:])
        # Right padding under causal attention never reaches a real token, and padded
        # positions carry no label, so no attention mask is needed (a padding mask makes
        # the CPU attention path several times slower).
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer_step(optimizer, lr=learning_rate(step, steps, lr, warmup_steps), grad_clip=1.0)
        window.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            history.append(sum(window) / len(window))
            echo(f"  step {step + 1}/{steps}: loss {history[-1]:.4f}")
            window = []
            if callback is not None:
                model.eval()
                callback(step + 1, model)
                model.train()
    model.eval()
    model.save_pretrained(path)
    return history


class quiet_transformers:
    """Context manager: transformers' warnings and load/save progress bars off, restored after.

    Example:
        >>> with quiet_transformers():      # doctest: +SKIP
        ...     build_char_model("/tmp/m")
    """

    def __enter__(self) -> "quiet_transformers":
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._verbosity)
        if self._bars:
            hf_logging.enable_progress_bar()
