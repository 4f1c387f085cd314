"""The optional per-row signals (``--signals ifd``): formulas on the conditional and unconditional losses.

``ce_loss`` is the student's mean cross-entropy of the reference after the row's prompt,
``ce_loss_uncond`` the same reference after the template's empty prompt
(:func:`srdata.steps.prompts.unconditional_prompt`); both are computed by the backend.
"""

from __future__ import annotations


def instruction_following_difficulty(ce_loss: float, ce_loss_uncond: float) -> float:
    """IFD = ce_loss / ce_loss_uncond: above 1 when the prompt makes the reference *less* likely.

    A zero unconditional loss (the reference is certain without any prompt) gives 1 when
    the conditional loss is zero too (the prompt changes nothing) and infinity otherwise
    (the prompt only hurts), so that every scored row keeps a rankable value.

    Example:
        >>> instruction_following_difficulty(1.5, 3.0)
        0.5
    """
    if ce_loss_uncond == 0:
        return 1.0 if ce_loss == 0 else float("inf")
    return ce_loss / ce_loss_uncond


def prompt_pmi(ce_loss: float, ce_loss_uncond: float, reference_tokens: int) -> float:
    """Nats the prompt saves on the whole reference: log p(reference | prompt) - log p(reference | empty prompt).

    The pointwise mutual information of prompt and reference under the student, summed
    over the reference tokens (end-of-sequence included): high when the reference answers
    *this* prompt, near zero or negative when it could follow any prompt (a swapped or
    misaligned answer). Unlike ``ifd``, a ratio of per-token means, it is not divided by
    the length, so a short label that any question makes likelier keeps a small value.

    Example:
        >>> prompt_pmi(1.5, 3.0, reference_tokens=4)
        6.0
    """
    return (ce_loss_uncond - ce_loss) * reference_tokens
