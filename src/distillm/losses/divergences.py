"""Per-token divergences between a teacher and a student distribution over the vocabulary.

Every function takes logits of shape ``[..., V]`` and returns a float32 tensor of shape ``[...]``. The
convention throughout, following the DistiLLM paper (Ko et al., ICML 2024):

* ``p = softmax(teacher_logits)`` is the teacher, ``q = softmax(student_logits)`` the student;
* the values are **true divergences**: zero when the two distributions are equal, so that a logged value
  means what its name says (the original code logs a cross-entropy as "forward KL", see docs/losses.md);
* softmaxes are taken in float32 whatever the input dtype, and mixtures are formed in log space
  (``logaddexp``), never as ``log(a p + b q)`` on probabilities, which underflows to ``log 0``;
* ``-inf`` logits (masked vocabulary entries, in either distribution or both) are allowed: a term whose
  weight is zero contributes zero, and the gradients stay finite. Every row needs at least one finite logit.

Plain KL is infinite when the distribution in the denominator of the log ratio is zero where the other one
is not (``KL(p || q)`` with ``q_v = 0 < p_v``). Such entries can only arise from ``-inf`` logits; like the
original code's ``inf_mask`` they are left out of the sum, so the value is the divergence restricted to the
entries where both distributions are non-zero. The skewed divergences and the JSD never need this: their
mixture is non-zero wherever the weighting distribution is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]


def _log_probs(logits: Tensor) -> Tensor:
    """float32 log-softmax over the last axis. [..., V] -> [..., V]."""
    return logits.float().log_softmax(-1)


def _kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) from log-probabilities. [..., V] -> [...].

    Entries where either log-probability is -inf contribute zero. The log ratio is zeroed *before* the
    product: ``0 * (-inf)`` would be NaN in the forward pass, and ``where`` applied after the product would
    still send ``0 * nan`` into the backward pass.
    """
    finite = ~(torch.isneginf(log_a) | torch.isneginf(log_b))  # [..., V]
    log_ratio = torch.where(finite, log_a - log_b, 0.0)  # [..., V]
    return (log_a.exp() * log_ratio).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities, in log space. [..., V] -> [..., V].

    Where both are -inf, ``logaddexp``'s backward evaluates ``exp(-inf - (-inf)) = nan``; those entries are
    computed on zeros and set back to -inf, so their (zero) gradient stays finite.
    """
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)  # [..., V]
    log_a = torch.where(both_zero, 0.0, log_a)
    log_b = torch.where(both_zero, 0.0, log_b)
    log_mix = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return log_mix.masked_fill(both_zero, -math.inf)


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p || q), the teacher-weighted KL of classic KD. [..., V] -> [...] float32."""
    return _kl_from_log_probs(_log_probs(teacher_logits), _log_probs(student_logits))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(q || p), the mode-seeking KL (MiniLLM's objective, token level). [..., V] -> [...] float32."""
    return _kl_from_log_probs(_log_probs(student_logits), _log_probs(teacher_logits))


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL, KL(p || alpha p + (1 - alpha) q) (DistiLLM's SKL). [..., V] -> [...] float32.

    ``alpha`` in (0, 1) is the paper's skew coefficient (default 0.1); alpha -> 0 recovers ``forward_kl``.
    """
    _check_open_unit("alpha", alpha)
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL, KL(q || (1 - alpha) p + alpha q) (DistiLLM's SRKL). [..., V] -> [...] float32.

    ``alpha`` in (0, 1) is the paper's skew coefficient (default 0.1); alpha -> 0 recovers ``reverse_kl``.
    """
    _check_open_unit("alpha", alpha)
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, alpha))


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD, beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q.

    GKD's convention (Agarwal et al., 2024), ``beta`` in (0, 1); beta = 0.5 is the symmetric Jensen-Shannon
    divergence. The original DistiLLM ``js_distance(lam=0.9)`` mixes m = (1 - lam) p + lam q, which is
    ``beta = 1 - lam = 0.1`` here. [..., V] -> [...] float32.
    """
    _check_open_unit("beta", beta)
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)


def total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Total variation distance, 1/2 sum_v |p_v - q_v|, in [0, 1]. [..., V] -> [...] float32."""
    p, q = _log_probs(teacher_logits).exp(), _log_probs(student_logits).exp()
    return 0.5 * (p - q).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
}
"""Name -> per-token divergence ``(student_logits, teacher_logits, ...) -> [...]``; the names configs use."""


def get_divergence(
    name: str, skew_alpha: float = 0.1, jsd_beta: float = 0.5
) -> Callable[[Tensor, Tensor], Tensor]:
    """The divergence called ``name``, with its hyper-parameter bound: ``(student_logits, teacher_logits)``.

    ``skew_alpha`` binds the skew divergences' alpha, ``jsd_beta`` the generalized JSD's beta; the others
    take neither.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    if name in ("skew_forward_kl", "skew_reverse_kl"):
        _check_open_unit("skew_alpha", skew_alpha)
        return partial(DIVERGENCES[name], alpha=skew_alpha)
    if name == "generalized_jsd":
        _check_open_unit("jsd_beta", jsd_beta)
        return partial(DIVERGENCES[name], beta=jsd_beta)
    return DIVERGENCES[name]
