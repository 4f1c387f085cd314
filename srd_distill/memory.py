"""Memory and precision levers of ``srd-distill``: dtypes, loading, gradient checkpointing, checkpoints.

* **Student**: float32 master weights (the optimizer's copy) whatever its saved dtype;
  forward passes run under autocast when ``--dtype`` is bfloat16/float16 (the default on
  GPUs, as in `srdata score`). Checkpoints are written back in the student's *saved* dtype
  (``--save-dtype auto``): a bfloat16 student stays a bfloat16 checkpoint, half the size
  of a float32 one.
* **Teacher**: frozen, run under ``torch.inference_mode`` and loaded in its saved dtype
  (``--teacher-dtype auto``), with two exceptions where that would be slow or wasteful:
  float16 on a CPU (CPUs have no fast float16 matmuls) and bfloat16 on a CPU without
  native bfloat16 instructions are upcast to float32; a float32 teacher on a GPU is loaded
  in the run's compute dtype, which autocast would use for its matmuls anyway.
* **Micro-batches** (``--micro-batch-tokens``, default 2048): a step whose rows hold more
  padded tokens is run as several forward/backward passes whose gradients add up to the
  same step (as ``--grad-accum``), so activation memory stays bounded whatever the batch.
* **Gradient checkpointing** (``--gradient-checkpointing``): the student keeps only each
  layer's input during the forward pass and recomputes the rest in the backward pass:
  activation memory shrinks several-fold for one more forward pass of the student.

Example:
    >>> import torch
    >>> resolve_teacher_dtype("auto", torch.bfloat16, torch.device("cuda"), torch.bfloat16)[0]
    torch.bfloat16
    >>> resolve_teacher_dtype("auto", torch.float16, torch.device("cpu"), torch.float32)[0]
    torch.float32
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from srd_distill.errors import TrainingSetupError
from srdata.backends.hf import DTYPES, resolve_device, resolve_dtype

__all__ = [
    "DTYPES",
    "resolve_precision",
    "saved_dtype",
    "cpu_has_native_bfloat16",
    "resolve_teacher_dtype",
    "load_model",
    "transformers_bars_off",
    "autocast_context",
    "weight_cast_scope",
    "enable_gradient_checkpointing",
    "save_checkpoint",
    "peak_memory_text",
    "micro_batch_count",
]

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


def resolve_precision(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype of a run, by the rule ``srdata score``'s HF backend uses.

    ``auto`` device: CUDA when visible. ``auto`` dtype: srdata's rule
    (:func:`srdata.backends.dtype.auto_dtype`: bfloat16 on a GPU and on CPUs with native
    bfloat16 matmuls, float32 elsewhere), so the student is scored and trained in the same precision.

    Example:
        >>> resolve_precision("cpu", "float32")
        (device(type='cpu'), torch.float32)
    """
    device = resolve_device(device_name)
    return device, resolve_dtype(dtype_name, device)


def saved_dtype(name: str | Path) -> torch.dtype:
    """The dtype a model's weights were saved in (``config.json``), float32 when it does not say.

    Example:
        >>> saved_dtype("HuggingFaceTB/SmolLM2-135M-Instruct")   # doctest: +SKIP
        torch.bfloat16
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def cpu_has_native_bfloat16() -> bool:
    """True when oneDNN runs bfloat16 matmuls natively on this CPU (AVX512-BF16 or AMX).

    The one rule srdata uses (:func:`srdata.backends.dtype.cpu_bfloat16`): oneDNN's own
    ``_is_mkldnn_bf16_supported`` is true on any AVX512 CPU, where bfloat16 is emulated.
    """
    from srdata.backends.dtype import cpu_bfloat16

    return cpu_bfloat16().fast()


def resolve_teacher_dtype(
    setting: str, saved: torch.dtype, device: torch.device, compute_dtype: torch.dtype
) -> tuple[torch.dtype, str]:
    """The dtype to load the teacher in, and a few words on why (see the module docstring).

    Example:
        >>> resolve_teacher_dtype("float32", torch.bfloat16, torch.device("cpu"), torch.float32)
        (torch.float32, 'as asked (--teacher-dtype float32)')
    """
    if setting != "auto":
        return DTYPES[setting], f"as asked (--teacher-dtype {setting})"
    name = str(saved).removeprefix("torch.")
    if device.type == "cpu":
        if saved == torch.float16:
            return torch.float32, "saved as float16, upcast: CPUs have no fast float16 matmuls"
        if saved == torch.bfloat16 and not cpu_has_native_bfloat16():
            return torch.float32, "saved as bfloat16, upcast: this CPU has no native bfloat16 matmuls"
        return saved, f"its saved dtype ({name})"
    if saved not in HALF and compute_dtype in HALF:
        return compute_dtype, f"saved as {name}; loaded in the compute dtype, which autocast uses anyway"
    return saved, f"its saved dtype ({name})"


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Silence transformers' own load/save progress bars, which would break into the training bar."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(name: str | Path, device: torch.device, dtype: torch.dtype, role: str) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` on ``device``; a readable error when it fails.

    Example:
        >>> load_model("./student", torch.device("cpu"), torch.float32, "student")   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    try:
        with transformers_bars_off():
            # safetensors only: pickle weights (pytorch_model.bin) can run code when loaded.
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"could not load the {role} model from {str(name)!r} ({err})") from err
    return model.to(device)


#: glibc ``mallopt`` parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory(device: torch.device) -> bool:
    """Training on a CPU: let glibc keep freed heap memory for the next allocation instead of returning it to the kernel.

    A training step allocates and frees the same large temporaries again and again (the fused
    head's (chunk, vocab) float32 work tensors, 25 MB each for a 49k vocabulary, several per
    chunk). By default glibc serves such blocks with fresh ``mmap`` pages or trims them off the
    heap when freed, so every allocation pays one page fault per 4 KiB page when first written
    (SmolLM2 x 2, batch 8 x 512: ~370,000 faults, ~0.6 s of a ~15.5 s step). Serving blocks up
    to 32 MiB from the heap and never trimming it makes them reuse the same pages: no faults
    after the first step, the same numbers bit for bit. Memory freed stays with the process (its
    peak is unchanged). Returns whether the setting took (glibc only; elsewhere it does nothing).

    Example:
        >>> keep_freed_memory(torch.device("cuda"))
        False
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(mallopt(option, value) == 1 for option, value in settings)


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes; float32 master weights stay in the optimizer.

    Example:
        >>> autocast_context(torch.device("cpu"), torch.float32)   # doctest: +ELLIPSIS
        <contextlib.nullcontext object at ...>
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu":  # SDPA's CPU flash kernel is no faster in bfloat16: batched matmuls instead
        return _CpuHalfPrecision(dtype)
    return torch.autocast(device_type=device.type, dtype=dtype)


def weight_cast_scope(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Hold around the micro-batches of one optimizer step (forwards and backwards, not the update):
    autocast then casts each float32 master weight to ``dtype`` once per step, not once per micro-batch.

    Autocast keeps its casts of leaf weights in a cache that it empties whenever the
    outermost autocast region is left, i.e. after every micro-batch's forward. This scope is
    an outer autocast region that is *disabled* (backward passes and all code between the
    forwards run as without it) and only keeps that cache alive until it is left, which
    must be before the optimizer changes the weights. The cached half copy stays an autograd
    cast of the float32 weight, so every micro-batch's weight gradient still lands in the
    float32 ``.grad``. A no-op for float32 runs.

    Example:
        >>> with weight_cast_scope(torch.device("cpu"), torch.float32):   # doctest: +SKIP
        ...     for micro_batch in micro_batches:
        ...         loss_of(micro_batch).backward()
        >>> optimizer_step(optimizer, lr=lr, grad_clip=1.0)   # doctest: +SKIP
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=False)


class _CpuHalfPrecision(contextlib.AbstractContextManager):
    """Autocast to ``dtype`` on the CPU, with :func:`srd_distill.cpu_attention.half_attention`; reusable, as autocast."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> "_CpuHalfPrecision":
        from srd_distill.cpu_attention import half_attention

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type="cpu", dtype=self.dtype))
        stack.enter_context(half_attention())
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._stacks.pop().__exit__(*exc)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing (the variant PyTorch recommends): gradients equal those
    without checkpointing, and inputs need not require gradients.

    Example:
        >>> enable_gradient_checkpointing(student)   # doctest: +SKIP
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainingSetupError(
            f"{type(model).__name__} does not support gradient checkpointing; run without --gradient-checkpointing "
            "(lower --batch-size or raise --grad-accum to save memory instead)"
        )
    from srd_distill.cpu_attention import same_on_recompute
    from srd_distill.cpu_mlp import swiglu_on_recompute

    # CPU bfloat16: a recomputed layer must run as its forward did (the grouped attention and block input casts,
    # the MLP activation's kernel).
    context_fn = swiglu_on_recompute(same_on_recompute(model), model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    model.config.use_cache = False


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, folder: Path, dtype: Optional[torch.dtype] = None) -> None:
    """Save model + tokenizer into ``folder`` (replacing an earlier checkpoint of ours) as a ``from_pretrained`` folder.

    ``dtype`` (e.g. the student's saved dtype): the weights are written in it, from a
    converted copy of the state dict, so the float32 master weights in memory stay as they
    are; ``config.json`` records it. Tied weights stay tied (one tensor per storage). The
    folder is marked as srd-distill's first (:func:`srd_distill.checkpoints.start_checkpoint`);
    a full disk or another write error removes the half-written folder and raises a
    ``WriteError`` naming it and the fix.

    Example:
        >>> save_checkpoint(student, tokenizer, Path("runs/kd/.stage-0.partial"), torch.bfloat16)   # doctest: +SKIP
    """
    from srd_distill.checkpoints import remove_checkpoint, save_error, start_checkpoint
    from srdata.run.io import FILE_MODE

    start_checkpoint(folder)
    try:
        write_pretrained(model, tokenizer, folder, dtype)
        for file in folder.iterdir():  # transformers writes the weights 0600 (a temp file renamed): follow the umask
            if file.is_file():
                file.chmod(FILE_MODE)
    except Exception as err:
        problem = save_error(err, folder, "a checkpoint")
        if problem is None:
            raise
        remove_checkpoint(folder)  # ours, half-written: give the space back
        raise problem from err


def write_pretrained(model: torch.nn.Module, tokenizer: Any, folder: Path, dtype: Optional[torch.dtype]) -> None:
    """``save_pretrained`` of the model (in ``dtype``, ties kept) and of the tokenizer into an existing ``folder``."""
    current = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with transformers_bars_off():
        if dtype is None or dtype == current:
            model.save_pretrained(folder)
        else:
            converted: dict[int, torch.Tensor] = {}  # by storage: tied tensors map to one converted tensor
            state = {}
            for key, tensor in model.state_dict().items():
                if not tensor.is_floating_point():
                    state[key] = tensor
                    continue
                ident = tensor.untyped_storage().data_ptr() + tensor.storage_offset()
                if ident not in converted:
                    converted[ident] = tensor.detach().to(dtype)
                state[key] = converted[ident]
            model.save_pretrained(folder, state_dict=state)
            previous = model.config.dtype
            model.config.dtype = dtype  # save_pretrained recorded the in-memory dtype; record the saved one
            try:
                model.config.save_pretrained(folder)
            finally:
                model.config.dtype = previous
    tokenizer.save_pretrained(folder)


def peak_memory_text(device: torch.device) -> str:
    """The process's peak memory so far, e.g. ``"peak RSS 5.1 GiB"`` (and the GPU's peak on CUDA).

    Example:
        >>> peak_memory_text(torch.device("cpu")).startswith("peak RSS")
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    text = f"peak RSS {peak / 2**30:.1f} GiB"
    if device.type == "cuda":
        text += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return text


def micro_batch_count(rows: int, width: int, max_tokens: int) -> int:
    """How many micro-batches keep each at ``max_tokens`` padded tokens or fewer (0 = no cap).

    ``rows`` rows padded to ``width`` tokens; near-equal parts (``data.split_rows``) of at
    most ``max_tokens // width`` rows each (one row at least, however long).

    Example:
        >>> micro_batch_count(16, 512, 2048), micro_batch_count(10, 700, 2048), micro_batch_count(16, 512, 0)
        (4, 5, 1)
    """
    if max_tokens <= 0:
        return 1
    rows_per_part = max(1, max_tokens // max(1, width))
    return -(-rows // rows_per_part)
