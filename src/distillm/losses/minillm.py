"""MiniLLM's policy-gradient terms (Gu et al., ICLR 2024): sequence-level reverse KL, token by token.

Convention, stated once for the whole module: ``q`` is the **student** (``q_theta`` the one being trained,
``q_old`` the student that scored the rollout), ``p`` the **teacher**, ``alpha`` the teacher's share of the
sampling mixture ``(1 - alpha) q_old + alpha p`` the rollouts were drawn from. Log-probabilities are those of
the sampled tokens, ``[B, R]`` over a response buffer of ``R`` steps; ``mask`` ``[B, R]`` (bool) marks the
real response tokens, the first EOS included (``docs/minillm.md``). Every function is zero, with a zero and
finite gradient, wherever ``mask`` is False, so padding changes nothing and an all-padding row contributes
nothing.

The pieces, in the order one training step uses them (``shared/reference/minillm-method.md``, sections 3-9):

1. :func:`mixed_sampling_weights`: the per-token importance weight ``w = q_old / ((1 - alpha) q_old + alpha p)``
   that corrects teacher-mixed sampling back to the student (section 3.4);
2. :func:`token_rewards`: ``clip((log p - log q_old) / reward_scaling, +-cliprange_reward)`` (section 5);
3. :func:`normalized_reward_to_go`: ``sum_{k>=t} gamma^(k-t) r_k`` divided by the number of remaining tokens
   (section 6);
4. :func:`whiten`: advantages shifted and scaled to mean 0, variance 1 over the real tokens (section 6);
5. :func:`clipped_policy_loss`: PPO's clipped surrogate on the ratio ``(q_theta / q_old) * w`` (section 7);
6. :func:`single_step_reverse_kl`: the exact token-level ``KL(q_theta || p)`` on the rollout (section 8);
7. :func:`pretraining_loss`: ``(1 - kd_ratio) CE + kd_ratio softCE`` on pre-training text (section 9);

and, for logging and evaluation, :func:`sampled_reverse_kl`: the per-token k3 estimate of ``KL(q || p)``
from the student's own samples (section 10).

All arithmetic happens in float32 at least (float64 stays float64, for the tests' references).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distillm import IGNORE_INDEX
from distillm.losses.divergences import reverse_kl
from distillm.losses.reduction import masked_mean, token_cross_entropy

__all__ = [
    "chunked_token_objective",
    "clipped_policy_loss",
    "mixed_sampling_weights",
    "normalized_reward_to_go",
    "pretraining_loss",
    "sampled_reverse_kl",
    "single_step_reverse_kl",
    "teacher_soft_cross_entropy",
    "token_rewards",
    "whiten",
]

# The original's whitening epsilon, added to the variance (LMOps `minillm/utils.py`, `whiten`).
WHITEN_EPS = 1e-8


def _wide(values: Tensor) -> Tensor:
    """Lower precisions widened to float32; float64 stays float64."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def _check_mask(mask: Tensor, *tensors: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    for tensor in tensors:
        if tensor.shape != mask.shape:
            raise ValueError(f"shape {tuple(tensor.shape)} differs from the mask's {tuple(mask.shape)}")


def mixed_sampling_weights(
    student_logprobs_old: Tensor, teacher_logprobs: Tensor, mask: Tensor, alpha: float
) -> Tensor:
    """Importance weights ``w = q_old / ((1 - alpha) q_old + alpha p)`` of the sampled tokens. [B, R] x2 -> [B, R].

    ``student_logprobs_old`` = ``log q_old(y_t | x, y_<t)``, ``teacher_logprobs`` = ``log p(y_t | x, y_<t)``.
    A per-token ratio (no product over the prefix), formed in log space: ``w = exp(log q_old - logaddexp(
    log(1 - alpha) + log q_old, log alpha + log p))``, so that tiny probabilities do not underflow to 0/0.
    ``0 < w <= 1 / (1 - alpha)``; exactly 1 for ``alpha = 0`` and wherever ``mask`` is False.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher_mix_alpha must be in [0, 1], got {alpha!r}")
    _check_mask(mask, student_logprobs_old, teacher_logprobs)
    log_q, log_p = _wide(student_logprobs_old), _wide(teacher_logprobs)
    log_student_share = math.log1p(-alpha) if alpha < 1.0 else -math.inf
    log_teacher_share = math.log(alpha) if alpha > 0.0 else -math.inf
    log_mix = torch.logaddexp(log_q + log_student_share, log_p + log_teacher_share)  # [B, R]
    log_weight = torch.where(mask, log_q - log_mix, 0.0)
    return log_weight.exp()


def token_rewards(
    teacher_logprobs: Tensor,
    student_logprobs_old: Tensor,
    mask: Tensor,
    reward_scaling: float = 0.5,
    cliprange_reward: float = 100.0,
) -> Tensor:
    """Per-token rewards ``clip((log p - log q_old) / reward_scaling, -c, c)``, 0 where masked. [B, R] x2 -> [B, R].

    ``reward_scaling`` 0.5 and ``cliprange_reward`` 100 are the original scripts' values (its argparse default
    for the clip, 1, is a different algorithm: docs/differences.md). The teacher's log-probabilities are taken
    without temperature (section 5). There is no terminal reward: the EOS step gets its own token reward.
    """
    if reward_scaling <= 0:
        raise ValueError(f"reward_scaling must be positive, got {reward_scaling!r}")
    if cliprange_reward <= 0:
        raise ValueError(f"cliprange_reward must be positive, got {cliprange_reward!r}")
    _check_mask(mask, teacher_logprobs, student_logprobs_old)
    log_ratio = torch.where(mask, _wide(teacher_logprobs) - _wide(student_logprobs_old), 0.0)
    return (log_ratio / reward_scaling).clamp(-cliprange_reward, cliprange_reward)


def normalized_reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 0.95) -> Tensor:
    """``G_t / n_t``: the discounted reward-to-go divided by the tokens left. [B, R] -> [B, R], 0 where masked.

    ``G_t = sum_{k >= t} gamma^(k - t) r_k`` includes ``r_t`` itself; ``n_t`` = the real tokens at positions
    ``>= t`` (``L - t`` for a response of ``L`` tokens), a plain count, not ``sum gamma^(k - t)``. The original
    always applies the division (its ``--length-norm`` flag changes only the logs, docs/differences.md).
    Computed as one product with the ``[R, R]`` matrix of discounts, without a loop over the steps.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    _check_mask(mask, rewards)
    values = torch.where(mask, _wide(rewards), 0.0)  # [B, R]
    steps = torch.arange(values.shape[-1], device=values.device)
    lag = steps[:, None] - steps[None, :]  # [R (k), R (t)]: k - t
    discount = torch.where(lag >= 0, gamma ** lag.clamp_min(0).to(values.dtype), 0.0)  # gamma^(k-t), k >= t
    reward_to_go = values @ discount  # [B, R]: G_t = sum_k r_k gamma^(k-t)
    remaining = mask.flip(-1).cumsum(-1).flip(-1).clamp_min(1)  # [B, R]: real tokens at positions >= t
    return torch.where(mask, reward_to_go / remaining, 0.0)


def whiten(
    values: Tensor, mask: Tensor, sum_over_processes: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the real tokens, population variance. [B, R] -> [B, R].

    Only positions where ``mask`` is True enter the mean and the variance, and only they get a value (0
    elsewhere): the original whitens over the padding too, so its advantages depend on how much padding a
    micro-batch carries (docs/differences.md). ``sum_over_processes``: sums a tensor over the data-parallel
    processes (an all-reduce), so that every process whitens with the same statistics, as the original does;
    None whitens with this process's tokens alone. An all-masked input gives zeros.
    """
    _check_mask(mask, values)
    reduce = sum_over_processes or (lambda tensor: tensor)
    values = torch.where(mask, _wide(values), 0.0)
    count_and_sum = reduce(torch.stack([mask.sum().to(values.dtype), values.sum()]))  # [2]
    count = count_and_sum[0].clamp_min(1)
    mean = count_and_sum[1] / count
    # The centred second moment (not E[x^2] - mean^2, which cancels catastrophically for a large mean).
    centred = torch.where(mask, values - mean, 0.0)
    variance = reduce(centred.square().sum()) / count
    return torch.where(mask, centred * torch.rsqrt(variance + WHITEN_EPS), 0.0)


def clipped_policy_loss(
    student_logprobs: Tensor,
    student_logprobs_old: Tensor,
    weights: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float = 0.2,
    num_tokens: int | Tensor | None = None,
) -> Tensor:
    """PPO's clipped surrogate on ``rho_t = (q_theta / q_old) * w_t``, a token mean. [B, R] x4 -> scalar.

    ``loss = sum_t mask_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) / num_tokens``: the gradient
    flows through ``student_logprobs`` (``log q_theta``) only; ``student_logprobs_old``, ``weights``
    (:func:`mixed_sampling_weights`) and ``advantages`` are the rollout's, fixed for all PPO epochs, and
    detached here. The clip acts on the **product** with ``w``, as in the original (section 7), so a token
    with ``w < 1 - eps`` and ``A < 0`` is clipped, with zero gradient, already in the first pass.
    ``num_tokens`` as in :func:`distillm.losses.masked_mean` (the step's real tokens; default: ``mask``'s).
    """
    if not 0.0 < cliprange < 1.0:
        raise ValueError(f"cliprange must be in (0, 1), got {cliprange!r}")
    _check_mask(mask, student_logprobs, student_logprobs_old, weights, advantages)
    # Masked before the exp: an exp of padding garbage must not meet the zero gradient of `where` (inf * 0).
    log_ratio = torch.where(mask, _wide(student_logprobs) - _wide(student_logprobs_old).detach(), 0.0)
    ratio = log_ratio.exp() * _wide(weights).detach()  # [B, R]
    advantages = _wide(advantages).detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)


def single_step_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, num_tokens: int | Tensor | None = None
) -> Tensor:
    """The exact reverse KL ``sum_v q_theta (log q_theta - log p)`` at each rollout step, a token mean. -> scalar.

    ``student_logits`` / ``teacher_logits`` ``[B, R, V]`` at the positions that predict the response tokens
    (already divided by the sampling temperature, as in the original); ``mask`` ``[B, R]``. The gradient
    flows through the student; no importance weight applies (section 8).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    _check_mask(mask, student_logits[..., 0])
    return masked_mean(reverse_kl(student_logits, teacher_logits.detach()), mask, num_tokens)


def teacher_soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``-sum_v p(v) log q(v)`` per position, float32 (float64 for float64). [..., V] x2 -> [...].

    The cross-entropy the original's pre-training term uses: ``KL(p || q)`` plus the teacher's entropy,
    which does not depend on the student, so the gradient is forward KL's.
    """
    log_q = _wide(student_logits).log_softmax(-1)
    p = _wide(teacher_logits).detach().softmax(-1)
    # 0 * log q = 0 where the teacher gives a token no mass, even where q does not either (-inf logits).
    return -torch.where(p > 0, p * log_q, 0.0).sum(-1)


def pretraining_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kd_ratio: float = 0.5,
    num_tokens: int | Tensor | None = None,
) -> Tensor:
    """``(1 - kd_ratio) CE + kd_ratio softCE`` on pre-training text, token means. [B, T, V] x2, [B, T] -> scalar.

    ``labels`` are shifted (``logits[:, t]`` predicts ``labels[:, t]``), ``IGNORE_INDEX`` where unsupervised;
    CE is ``-log q(label)`` (no temperature), softCE :func:`teacher_soft_cross_entropy` with the teacher
    detached. The scripts' ``kd_ratio`` is 0.5 (the original's default, None, crashes).
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio!r}")
    mask = labels != IGNORE_INDEX  # [B, T]
    ce = masked_mean(token_cross_entropy(student_logits, labels), mask, num_tokens)
    soft_ce = masked_mean(teacher_soft_cross_entropy(student_logits, teacher_logits), mask, num_tokens)
    return (1.0 - kd_ratio) * ce + kd_ratio * soft_ce


def sampled_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token estimate ``e^d - 1 - d``, ``d = log p - log q``, of ``KL(q || p)``. [B, R] x2 -> [B, R].

    The "k3" estimator the original logs and evaluates: unbiased for the reverse KL when the tokens are
    sampled from ``q`` itself (``E_q[p/q] = 1``), and never negative. 0 where ``mask`` is False. Summed over a
    response it estimates the sequence-level reverse KL that MiniLLM minimises.
    """
    _check_mask(mask, student_logprobs, teacher_logprobs)
    log_ratio = torch.where(mask, _wide(teacher_logprobs) - _wide(student_logprobs), 0.0)
    return torch.expm1(log_ratio) - log_ratio


ChunkObjective = Callable[[Tensor, slice], Tensor]  # (logits [c, V] float32, rows) -> terms [K]


def chunked_token_objective(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, objective: ChunkObjective, chunk_size: int
) -> Tensor:
    """``sum over row chunks of objective(hidden[rows] @ weight.T + bias, rows)``, never more than a chunk of logits.

    ``hidden`` ``[N, H]`` (the student's final hidden states at the scored positions), ``weight`` ``[V, H]``,
    ``objective`` maps a chunk's float32 logits ``[c, V]`` and its row slice to a vector of terms ``[K]``
    (a sum over the chunk's tokens: the first term is the loss, the others are logged). Each chunk runs under
    activation checkpointing: its ``[c, V]`` logits and the objective's intermediates are dropped after the
    forward and recomputed in backward, so at a 50k vocabulary only one chunk's ``[c, V]`` tensors exist at a
    time (one more head matmul per chunk than the dense path). The objective must be deterministic (it runs
    twice); teacher logits it needs are best recomputed from the teacher's hidden states inside it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        terms = checkpoint(_chunk_terms, hidden[rows], weight, bias, rows, objective, use_reentrant=False)
        total = terms if total is None else total + terms
    if total is None:  # no rows: the objective of nothing, with a zero gradient to the head
        return objective(F.linear(hidden, weight, bias).float(), slice(0, 0))
    return total


def _chunk_terms(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: slice, objective: ChunkObjective
) -> Tensor:
    return objective(F.linear(hidden, weight, bias).float(), rows)  # [c, V] fp32 for the softmaxes
