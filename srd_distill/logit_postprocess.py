"""What a model does to ``lm_head(h)`` before it returns logits, and the derivative of that.

Some architectures change the head's output: Gemma 2/3 soft-cap ``cap * tanh(z / cap)``,
Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``. The fused LM
head (:mod:`srd_distill.fused_head`) applies the same per chunk of tokens, and chains the
logit gradient back through it.

Example:
    >>> import torch
    >>> post = LogitPostprocess(scale=2.0, softcap=1.0)
    >>> z = post.apply_(torch.tensor([0.0, 10.0]))
    >>> z.tolist(), post.chain_(torch.ones(2), z).tolist()
    ([0.0, 1.0], [2.0, 0.0])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["LogitPostprocess"]


@dataclass(frozen=True)
class LogitPostprocess:
    """``z = lm_head(h) * scale``, then ``cap * tanh(z / cap)`` when ``softcap`` is set.

    Example:
        >>> LogitPostprocess.from_config(type("C", (), {"final_logit_softcapping": 30.0})())
        LogitPostprocess(scale=1.0, softcap=30.0)
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def from_config(cls, config: Any) -> "LogitPostprocess":
        """Read the known post-processing settings (Gemma 2/3, Cohere, Granite) from a model config."""
        scale = 1.0
        logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
        if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
            scale *= float(logit_scale)
        logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
        if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool) and logits_scaling:
            scale /= float(logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        return cls(scale, float(softcap) if softcap else None)

    def describe(self) -> str:
        """E.g. ``"logits x 0.25, soft-capped at 30"``; empty when there is no post-processing."""
        parts = ([f"logits x {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"soft-capped at {self.softcap:g}"] if self.softcap is not None else []
        )
        return ", ".join(parts)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply_(self, z: Tensor) -> Tensor:
        """Post-process raw head outputs ``z`` in place (float32 or wider); returns ``z``."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def chain_(self, grad: Tensor, z: Tensor) -> Tensor:
        """Turn ``dL/d(post-processed z)`` into ``dL/d(raw z)`` in place, given the post-processed ``z``."""
        if self.softcap is not None:
            # d(cap tanh(u / cap))/du = 1 - tanh^2 = 1 - (z / cap)^2.
            grad.mul_(1.0 - (z / self.softcap).square_())
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad
