"""One optimizer step, its learning rate and its optimizer: the pieces every training loop here shares.

``srd-distill``'s loop (:func:`srd_distill.train.train_stage`) and the supervised
fine-tuning of the demo and testbed models (:func:`srdata.demo.tiny.train_on_pairs`) step
the same way, nanoGPT's way::

    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.01, device=device)
    for step in range(total_steps):
        for micro_batch in micro_batches:               # gradients add up
            loss_of(micro_batch).backward()
        optimizer_step(optimizer, lr=learning_rate(step, total_steps, 3e-4, warmup_steps=10), grad_clip=1.0)

Example:
    >>> [round(learning_rate(s, 4, 1.0), 3) for s in range(4)]
    [1.0, 0.854, 0.5, 0.146]
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["learning_rate", "make_optimizer", "optimizer_step"]


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0.

    The cosine part is transformers' ``get_cosine_schedule_with_warmup``; warm-up starts
    at ``peak_lr / warmup_steps`` rather than 0, so no step is wasted at lr 0.

    Example:
        >>> [round(learning_rate(s, 4, 1.0, warmup_steps=2), 3) for s in range(4)]
        [0.5, 1.0, 1.0, 0.5]
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device, compute_dtype: torch.dtype = torch.float32
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and norm gains), as nanoGPT does.

    Implementation: fused on GPUs. On a CPU, ``foreach`` (one multi-tensor op per update
    term instead of a Python loop over ~300 tensors; its float32 results are bit-identical
    to the loop's), and the fused CPU kernel (one pass over each tensor; equal to float32
    rounding, not bit for bit) when the run computes in bfloat16 (``compute_dtype``), whose
    loss curves are not bit-comparable with float32 anyway.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> [g["weight_decay"] for g in make_optimizer(model, 1e-3, 0.1, torch.device("cpu")).param_groups]
        [0.1, 0.0]
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if device.type == "cuda" or (device.type == "cpu" and compute_dtype == torch.bfloat16):
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=device.type == "cpu" or None)


def optimizer_step(
    optimizer: torch.optim.Optimizer, *, lr: float, grad_clip: float, scaler: Optional[torch.amp.GradScaler] = None
) -> float:
    """Apply the gradients that ``backward()`` accumulated: set ``lr``, clip, step, zero; return the gradient norm.

    ``grad_clip`` is the largest gradient norm kept (0: no clipping; the norm is still
    measured, for the logs). With a ``scaler`` (float16 training) the gradients are
    unscaled before clipping and a step with inf/nan gradients is skipped.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = make_optimizer(model, 0.1, 0.0, torch.device("cpu"))
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> round(optimizer_step(optimizer, lr=0.1, grad_clip=1.0), 3)   # grads are all 1: norm 2
        2.0
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
