"""Masked reductions of per-token losses, normalised by the valid tokens of the whole optimizer step.

A token mean taken per micro-batch makes the loss depend on how a step is split into micro-batches (a
micro-batch with 3 valid tokens would weigh as much as one with 300). The training loop therefore counts
the valid tokens of the whole step first (all accumulation micro-batches, all processes) and passes that
count as ``num_tokens``: the per-micro-batch losses then sum to the step's token mean, and batch 4 x
accumulation 1 gives the same loss and gradient as 2 x 2 (see TRL PR #6006 for the bug this avoids).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distillm import IGNORE_INDEX

__all__ = [
    "LossParts",
    "check_objective",
    "distillation_loss",
    "masked_mean",
    "masked_sum",
    "token_cross_entropy",
]


def _at_least_float32(values: Tensor) -> Tensor:
    """Lower precisions widened to float32; float64 stays float64 (the tests' reference runs)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where the boolean ``mask`` is true, in float32 (float64 for float64). [...] , [...] -> scalar.

    Masked positions are selected out with ``where`` rather than multiplied by zero, so a NaN or inf at a
    masked position (a padding row, say) does not leak into the sum.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from values shape {tuple(values.shape)}")
    return torch.where(mask, _at_least_float32(values), 0.0).sum()


def masked_mean(values: Tensor, mask: Tensor, num_tokens: int | Tensor | None = None) -> Tensor:
    """``masked_sum(values, mask) / num_tokens``: a token mean over the valid positions. -> scalar float32.

    ``num_tokens`` is the number of valid tokens of the whole optimizer step (all micro-batches, all
    processes); when omitted, the valid tokens of ``mask`` are counted. The denominator is clamped to at
    least 1, so an all-masked batch gives 0 with a zero, finite gradient.
    """
    if num_tokens is None:
        num_tokens = mask.sum()
    total = masked_sum(values, mask)
    denominator = torch.as_tensor(num_tokens, dtype=total.dtype, device=values.device).clamp_min(1)
    return total / denominator


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy -log q(label), float32 (float64 for float64); 0 where ``labels == IGNORE_INDEX``. [..., V], [...] -> [...].

    ``labels`` are already shifted (design.md's batch contract): ``logits[..., t, :]`` predicts ``labels[..., t]``.
    """
    flat = F.cross_entropy(
        _at_least_float32(logits).reshape(-1, logits.shape[-1]),  # [N, V]
        labels.reshape(-1),  # [N]
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.view(labels.shape)


class LossParts(NamedTuple):
    """One micro-batch's objective and its two terms, each a token mean over the step's valid tokens.

    ``total = (1 - kd_ratio) * ce + kd_ratio * divergence`` carries the gradient; ``ce`` and ``divergence``
    are detached, for logging (``divergence`` is 0 when no divergence is used).
    """

    total: Tensor
    ce: Tensor
    divergence: Tensor


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    divergence: Callable[[Tensor, Tensor], Tensor] | None,
    kd_ratio: float,
    num_tokens: int | Tensor | None = None,
    teacher_logits: Tensor | None = None,
) -> LossParts:
    """The dense objective on full logits: ``((1 - kd_ratio) sum CE + kd_ratio sum D) / num_tokens``.

    student_logits, teacher_logits: [..., V]; labels: [...] with ``IGNORE_INDEX`` on unsupervised positions;
    divergence: ``(student_logits, teacher_logits) -> [...]`` (see ``get_divergence``), or None for plain
    fine-tuning (then ``kd_ratio`` must be 0). ``num_tokens`` as in ``masked_mean``. For the memory-efficient
    path on hidden states, see ``distillm.losses.chunked``.
    """
    check_objective(divergence, kd_ratio, teacher_logits is not None)
    mask = labels != IGNORE_INDEX  # [...]
    # With kd_ratio = 1 the CE is only logged: keep it out of the autograd graph.
    ce_input = student_logits.detach() if kd_ratio == 1.0 else student_logits
    ce = masked_mean(token_cross_entropy(ce_input, labels), mask, num_tokens)
    if divergence is None:
        return LossParts(total=ce, ce=ce.detach(), divergence=torch.zeros_like(ce))
    div = masked_mean(divergence(student_logits, teacher_logits), mask, num_tokens)
    total = (1.0 - kd_ratio) * ce + kd_ratio * div
    return LossParts(total=total, ce=ce.detach(), divergence=div.detach())


def check_objective(divergence: object, kd_ratio: float, has_teacher: bool) -> None:
    """Reject combinations that would silently train on a different objective than asked (ValueError).

    Shared by the dense (``distillation_loss``) and the chunked (``chunked_distillation_loss``) paths.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio!r}")
    if divergence is None and kd_ratio > 0:
        raise ValueError(f"kd_ratio={kd_ratio} needs a divergence")
    if divergence is not None and not has_teacher:
        raise ValueError("a divergence needs the teacher (its logits, or its hidden states and head)")
