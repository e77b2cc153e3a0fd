"""The memory-efficient distillation objective: from hidden states, token-chunk by token-chunk.

The dense path materialises the student's ``[tokens, V]`` logits, the teacher's, and every ``[tokens, V]``
intermediate the divergence keeps for backward (log-softmaxes, the mixture, ...): at V = 49152 that is
gigabytes for a few thousand tokens. Here the student's final hidden states and ``lm_head`` weight go in
instead of logits, and only ``chunk_size`` rows of logits exist at any time, in the forward **and** the
backward pass. The teacher may be given as logits (its rows are sliced per chunk) or, better, as hidden
states and head weight, so its logits are never materialised either.

Unlike Liger-Kernel's fused distillation losses (generalized JSD only), any divergence of
``distillm.losses.divergences`` works here, the skew divergences included: the per-chunk math is the dense
function itself, differentiated by autograd on one chunk.

Layout: ``_chunk_objective`` is the math of one chunk; ``_ChunkedObjective`` is the memory strategy;
``chunked_distillation_loss`` checks the inputs and normalises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distillm import IGNORE_INDEX
from distillm.losses.reduction import LossParts, check_objective, token_cross_entropy

__all__ = ["chunked_distillation_loss"]

Divergence = Callable[[Tensor, Tensor], Tensor]
TeacherRows = Callable[[Tensor], Tensor]  # token indices [c] -> teacher logits [c, V]


def _chunk_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    divergence: Divergence | None,
    ce_weight: float,
    kd_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's ``ce_weight * sum CE + kd_weight * sum D``, and its per-token CE and D.

    [c, V], [c, V] | None, [c] -> (scalar, [c], [c]), float32. The same math as the dense path, nothing
    fused; D is 0 without a divergence. A term of weight 0 (the CE when kd_ratio = 1) is computed outside
    the autograd graph: it is only logged.
    """
    ce = token_cross_entropy(student_logits if ce_weight else student_logits.detach(), labels)  # [c]
    if divergence is None:
        return ce_weight * ce.sum(), ce, torch.zeros_like(ce)
    div = divergence(student_logits if kd_weight else student_logits.detach(), teacher_logits)  # [c]
    return ce_weight * ce.sum() + kd_weight * div.sum(), ce, div


class _ChunkedObjective(torch.autograd.Function):
    """``sum(ce_weight * CE + kd_weight * D) / denominator`` over the given rows, and the two sums / denominator.

    The gradient is computed chunk by chunk.

    Why the gradient is computed in the forward pass (as Liger-Kernel does) rather than by recomputing
    each chunk in backward: the objective is a scalar, so its gradient w.r.t. the hidden states and the
    head is fixed up to the scalar ``grad_output`` once the forward pass has seen each chunk. Computing it
    there costs the same three matmuls per chunk as dense autograd (logits, d hidden, d weight), where
    recomputation would add a fourth; the price is holding ``[N, H]`` + ``[V, H]`` of gradient between
    forward and backward, the size of the inputs themselves. When no input needs a gradient (evaluation),
    no gradient is computed.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        rows: Tensor,  # [S] long, the supervised token indices
        labels: Tensor,  # [N]
        teacher_rows: TeacherRows | None,
        divergence: Divergence | None,
        ce_weight: float,
        kd_weight: float,
        chunk_size: int,
        denominator: Tensor,  # 0-dim float32, >= 1
    ) -> tuple[Tensor, Tensor, Tensor]:
        want_grad = any(ctx.needs_input_grad[:3])
        device = student_hidden.device
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        div_sum = torch.zeros((), dtype=torch.float32, device=device)
        if want_grad:
            # fp32 accumulators: summing many bf16 chunk contributions in bf16 would lose precision, and
            # dividing by the token count in bf16 would round the count (2047 -> 2048).
            grad_hidden = torch.zeros_like(student_hidden, dtype=torch.float32)  # [N, H]
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # [V, H]
            grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)  # [V]

        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]  # [c]
            hidden = student_hidden.index_select(0, chunk_rows)  # [c, H]
            logits = F.linear(hidden, weight, bias).float()  # [c, V], fp32 for the softmaxes
            teacher = None if teacher_rows is None else teacher_rows(chunk_rows)  # [c, V]
            chunk_labels = labels.index_select(0, chunk_rows)  # [c]
            with torch.enable_grad():
                logits.requires_grad_(want_grad)
                objective, ce, div = _chunk_objective(
                    logits, teacher, chunk_labels, divergence, ce_weight, kd_weight
                )  # scalar, [c], [c]
            ce_sum += ce.detach().sum()
            div_sum += div.detach().sum()
            if not want_grad:
                continue
            (grad_logits,) = torch.autograd.grad(objective, logits)  # [c, V] fp32
            grad_logits = grad_logits.to(weight.dtype)  # the matmuls run in the head's dtype, as in dense
            grad_hidden.index_copy_(0, chunk_rows, (grad_logits @ weight).float())  # [c, H]
            if grad_weight.dtype == hidden.dtype:
                grad_weight.addmm_(grad_logits.T, hidden)  # [V, H], in place: no [V, H] temporary per chunk
            else:
                grad_weight += grad_logits.T.mm(hidden).float()  # [V, H], a bf16 product into fp32
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)  # [V]

        if want_grad:
            # Normalising in here (in place) makes the upstream gradient 1 in the usual `loss.backward()`.
            grad_hidden = grad_hidden.div_(denominator).to(student_hidden.dtype)
            grad_weight = grad_weight.div_(denominator).to(weight.dtype)
            if grad_bias is not None:
                grad_bias = grad_bias.div_(denominator).to(bias.dtype)
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ce_mean, div_mean = ce_sum / denominator, div_sum / denominator
        ctx.mark_non_differentiable(ce_mean, div_mean)
        return ce_weight * ce_mean + kd_weight * div_mean, ce_mean, div_mean

    @staticmethod
    def backward(ctx, grad_objective: Tensor, _grad_ce: Tensor, _grad_div: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # The objective is linear in grad_objective, a scalar. It is 1 in the usual `loss.backward()`: then
        # the saved gradients are returned as they are, without a second [V, H] copy (a sync on GPU, once).
        if not torch.equal(grad_objective, torch.ones_like(grad_objective)):
            grad_hidden = grad_hidden * grad_objective.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_objective.to(grad_weight.dtype)
            grad_bias = None if grad_bias is None else grad_bias * grad_objective.to(grad_bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def chunked_distillation_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    divergence: Divergence | None,
    kd_ratio: float,
    num_tokens: int | Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    chunk_size: int = 128,
    lm_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
) -> LossParts:
    """``((1 - kd_ratio) sum CE + kd_ratio sum D) / num_tokens`` over the supervised tokens, in chunks.

    Same value and gradients as ``distillation_loss`` on ``student_logits = student_hidden @ lm_head_weight.T
    (+ lm_head_bias)``, without ever holding more than ``chunk_size`` rows of logits.

    Args:
        student_hidden: [..., H] the student's final hidden states (after the final norm), any float dtype.
        lm_head_weight: [V, H] the student's output head (``model.get_output_embeddings().weight``).
        labels: [...] target ids, ``IGNORE_INDEX`` where a token is not supervised; only supervised rows
            are computed at all.
        divergence: ``(student_logits, teacher_logits) -> [...]`` (see ``get_divergence``), or None for
            plain fine-tuning (then kd_ratio must be 0 and no teacher is needed).
        kd_ratio: weight of the divergence in [0, 1]; the CE gets ``1 - kd_ratio``.
        num_tokens: the valid tokens of the whole optimizer step (see ``reduction``); default: this call's.
        teacher_logits: [..., V] the teacher's logits, or instead
        teacher_hidden, teacher_head_weight, teacher_head_bias: [..., Ht], [V, Ht], [V], so the teacher's
            logits are also computed per chunk. The teacher gets no gradient.
        chunk_size: supervised tokens per chunk; memory grows as ``chunk_size * V``. The default, 128, keeps
            the chunk's intermediates near 10 x 128 x V x 4 bytes (250 MB at V = 49152); on a GPU, larger
            chunks (Liger uses 1024) use the device better where memory allows.
        lm_head_bias: [V] the student's head bias, if it has one.

    Returns:
        ``LossParts(total, ce, divergence)``: ``total`` carries the gradient to ``student_hidden``,
        ``lm_head_weight`` and ``lm_head_bias``; ``ce`` and ``divergence`` are the detached token means.
    """
    teacher_rows = _teacher_rows(
        student_hidden, lm_head_weight, teacher_logits, teacher_hidden, teacher_head_weight, teacher_head_bias
    )
    check_objective(divergence, kd_ratio, teacher_rows is not None)
    _check_student(student_hidden, lm_head_weight, labels, lm_head_bias, chunk_size)

    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # [N, H]
    flat_labels = labels.reshape(-1)  # [N]
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)  # [S]
    if divergence is None:
        teacher_rows = None  # the teacher's logits are not needed for the CE alone
    if num_tokens is None:
        num_tokens = rows.numel()
    denominator = torch.as_tensor(num_tokens, dtype=torch.float32, device=hidden.device).clamp_min(1)
    total, ce, div = _ChunkedObjective.apply(
        hidden,
        lm_head_weight,
        lm_head_bias,
        rows,
        flat_labels,
        teacher_rows,
        divergence,
        1.0 - kd_ratio,
        kd_ratio,
        chunk_size,
        denominator,
    )
    return LossParts(total=total, ce=ce, divergence=div)


def _teacher_rows(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    teacher_head_bias: Tensor | None,
) -> TeacherRows | None:
    """A function from token indices to the teacher's logits of those tokens (no gradient), or None."""
    lead = student_hidden.shape[:-1]
    vocab = lm_head_weight.shape[0]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_head_weight is not None:
            raise ValueError("give the teacher as logits or as hidden states + head weight, not both")
        if teacher_logits.shape != (*lead, vocab):
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} should be {(*lead, vocab)} "
                "(the student's token axes and vocabulary)"
            )
        flat_logits = teacher_logits.detach().reshape(-1, vocab)  # [N, V]
        return lambda rows: flat_logits.index_select(0, rows)
    if teacher_hidden is None and teacher_head_weight is None:
        return None
    if teacher_hidden is None or teacher_head_weight is None:
        raise ValueError("teacher_hidden and teacher_head_weight go together")
    if teacher_hidden.shape[:-1] != lead or teacher_head_weight.shape != (vocab, teacher_hidden.shape[-1]):
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_head_weight "
            f"{tuple(teacher_head_weight.shape)} should be [*{tuple(lead)}, Ht] and [{vocab}, Ht]"
        )
    flat_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # [N, Ht]
    weight = teacher_head_weight.detach()
    bias = None if teacher_head_bias is None else teacher_head_bias.detach()

    def rows_logits(rows: Tensor) -> Tensor:
        with torch.no_grad():
            return F.linear(flat_hidden.index_select(0, rows), weight, bias)  # [c, V]

    return rows_logits


def _check_student(
    student_hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, chunk_size: int
) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight {tuple(weight.shape)} should be [V, {student_hidden.shape[-1]}] "
            f"for student_hidden {tuple(student_hidden.shape)}"
        )
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} should have student_hidden's token axes "
            f"{tuple(student_hidden.shape[:-1])}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lm_head_bias {tuple(bias.shape)} should be [{weight.shape[0]}]")
