"""Tiny random-weight causal LMs with a tokenizer trained on the spot.

Used by the offline demo, the tests and the benchmarks: nothing is downloaded. The model
and tokenizer are saved with ``save_pretrained`` and must be loaded back through the
normal ``from_pretrained`` path, exactly as a real student would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

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
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

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
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if not pad_token:
        tokenizer.pad_token = None
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def warm_up(path: str | Path, texts: list[str], steps: int = 60, lr: float = 3e-3, seed: int = 0) -> Path:
    """Briefly train the saved model at ``path`` on ``texts`` (causal LM loss) and save it back.

    The demo uses this to make a student that knows some rows better than others, so the
    ranking has something real to find.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:256] + [tokenizer.eos_token_id] for t in texts]
    for step in range(steps):
        batch = [encoded[(step * 8 + k) % len(encoded)] for k in range(8)]
        width = max(len(b) for b in batch)
        ids = torch.tensor([b + [tokenizer.eos_token_id] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return Path(path)


def build_qwen2_05b_layout(path: str | Path, texts: Iterable[str], *, vocab_size: int = 32_000, seed: int = 0, dtype: str = "float32") -> Path:
    """Save a random-weight Qwen2 with the 0.5B layout (896 hidden, 24 layers) and a tokenizer trained on ``texts``.

    For GPU checks, where a real architecture's size matters but nothing can be downloaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

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
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
