"""Per-token divergences between a teacher and a student distribution over the vocabulary, and their registry.

``DIVERGENCES`` (at the end) holds one :class:`Divergence` record per divergence: its name, its reference
definition, an optional closed-form student gradient and its hyper-parameters with their ranges. Config
validation and help, ``get_divergence`` and the tests read it: adding a divergence is one record here (plus
its reference function) and one line of tests (docs/design.md, "Where to add things").

Every divergence takes logits of shape ``[..., V]`` and returns a float32 tensor of shape ``[...]`` (float64
for float64 logits, so that the gradients can be checked numerically). The convention throughout, following
the DistiLLM paper (Ko et al., ICML 2024):

* ``p = softmax(teacher_logits)`` is the teacher, ``q = softmax(student_logits)`` the student;
* the values are **true divergences**: zero when the two distributions are equal, so that a logged value
  means what its name says (the original code logs a cross-entropy as "forward KL", see docs/losses.md);
* softmaxes are taken in float32 whatever the (lower) input dtype, and mixtures are formed in log space
  (``logaddexp``), never as ``log(a p + b q)`` on probabilities, which underflows to ``log 0``;
* ``-inf`` logits (masked vocabulary entries, in either distribution or both) are allowed: a term whose
  weight is zero contributes zero, and the gradients stay finite. Every row needs at least one finite logit.

Plain KL is infinite when the distribution in the denominator of the log ratio is zero where the other one
is not (``KL(p || q)`` with ``q_v = 0 < p_v``). Such entries can only arise from ``-inf`` logits; like the
original code's ``inf_mask`` they are left out of the sum, so the value is the divergence restricted to the
entries where both distributions are non-zero. The skewed divergences and the JSD never need this: their
mixture is non-zero wherever the weighting distribution is.

Gradients. When only the student's logits need a gradient (the trainer's case), a divergence with a closed
form runs as a
``torch.autograd.Function`` that computes the value and the gradient w.r.t. the student's logits together in
the forward pass, in closed form (``_closed_*``), and saves that one float32 ``[..., V]`` gradient instead
of autograd's chain of intermediates. When the teacher's logits need a gradient too, and for double backward
(``create_graph=True``), autograd differentiates the definitions themselves (``_reference_*``), which are
kept for that and as the tests' reference; so does every gradient of a divergence registered without a
closed form. Without any gradient to compute, only the value is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "HYPER_PARAMETERS",
    "Divergence",
    "HyperParameter",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]


def _log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over the last axis in float32, or float64 for float64 logits. [..., V] -> [..., V]."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


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


# ---- dispatch: closed-form student gradient, or autograd through the reference -------------------------

Reference = Callable[[Tensor, Tensor], Tensor]  # (student_logits, teacher_logits) -> [...], by autograd
ClosedForm = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]]
# (log_q, log_p, with_grad) -> (value [...], d value / d student_logits [..., V] float32 or None)


def _divergence(
    student_logits: Tensor, teacher_logits: Tensor, reference: Reference, closed_form: ClosedForm | None
) -> Tensor:
    """The divergence's value, differentiated in closed form where that is the whole story.

    Without a closed form, and for a teacher that needs a gradient (the closed forms give the student's
    gradient only), autograd differentiates the reference; without any gradient to compute, only the value
    is computed.
    """
    if closed_form is None or (torch.is_grad_enabled() and teacher_logits.requires_grad):
        return reference(student_logits, teacher_logits)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _StudentGradient.apply(student_logits, teacher_logits, reference, closed_form)
    value, _ = closed_form(_log_probs(student_logits), _log_probs(teacher_logits), False)
    return value


class _StudentGradient(torch.autograd.Function):
    """A divergence whose gradient w.r.t. the student's logits is computed in closed form, in forward.

    The forward pass computes the value and ``d value / d student_logits`` together, since they share their
    intermediates (log-softmaxes, the mixture, the log ratios), and saves that gradient alone: one float32
    ``[..., V]`` tensor, where autograd through the reference keeps up to seven. Backward scales it by the
    upstream gradient and casts it to the student's dtype. The inputs are kept by reference (no copy) for
    double backward: under ``create_graph`` the gradient is recomputed by autograd through the reference,
    so second derivatives are the reference's.
    """

    @staticmethod
    def forward(
        ctx,
        student_logits: Tensor,  # [..., V], requires grad
        teacher_logits: Tensor,  # [..., V], no grad
        reference: Reference,
        closed_form: ClosedForm,
    ) -> Tensor:
        value, grad = closed_form(_log_probs(student_logits), _log_probs(teacher_logits), True)
        ctx.reference = reference
        if teacher_logits.is_inference():  # inference tensors cannot be saved; the teacher is only read
            ctx.save_for_backward(grad, student_logits)
            ctx.inference_teacher = teacher_logits
        else:
            ctx.save_for_backward(grad, student_logits, teacher_logits)
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor):  # [...] float32
        grad, student_logits, *saved_teacher = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            teacher_logits = saved_teacher[0] if saved_teacher else ctx.inference_teacher
            with torch.enable_grad():
                value = ctx.reference(student_logits, teacher_logits)
                (grad_student,) = torch.autograd.grad(value, student_logits, grad_value, create_graph=True)
            return grad_student, None, None, None
        return (grad * grad_value.unsqueeze(-1)).to(student_logits.dtype), None, None, None


# ---- closed forms ---------------------------------------------------------------------------------------
# Each takes the log-probabilities log_q, log_p (fresh float tensors that it owns and overwrites: memory is
# the point) and returns the value and, if asked, dL/ds for L the divergence and s the student's logits. They
# write it as G = dL/d(log q), then dL/ds = G - q sum_v G_v (the log-softmax's Jacobian). The values are
# computed with the same floating-point operations as the references, so they agree to the bit; terms the
# references leave out (a zero weight, a -inf log ratio) are zeroed the same way and get a zero G, so no NaN
# reaches the gradient. At most four [..., V] float buffers are alive at once (the reference keeps ~10).


def _finite_or_zero(log_ratio: Tensor) -> Tensor:
    """``log_ratio`` where it is finite, 0 where it is +-inf or NaN (either side -inf), in place.

    The same as ``_kl_from_log_probs``'s ``where(finite, log_a - log_b, 0)``: the difference of two finite
    log-probabilities (both <= 0) cannot overflow, so it is non-finite exactly where one side is -inf.
    """
    return log_ratio.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _student_grad(grad_log_q: Tensor, q: Tensor) -> Tensor:
    """dL/ds = G - q sum_v G_v from G = dL/d(log q), in place on G. [..., V] -> [..., V]."""
    return grad_log_q.addcmul_(q, grad_log_q.sum(-1, keepdim=True), value=-1.0)


def _log_mixture_into(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``_log_mixture``'s value, log(weight_a a + (1 - weight_a) b), in one new buffer. [..., V] -> [..., V].

    Entries where both are zero come out -inf (``logaddexp(-inf, -inf)``); the closed forms give them
    weight 0, and do not differentiate through ``logaddexp``, so they need no masking.
    """
    shifted_a = log_a + math.log(weight_a)
    return torch.logaddexp(shifted_a, log_b + math.log1p(-weight_a), out=shifted_a)


def _closed_forward_kl(log_q: Tensor, log_p: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(p || q); G = -p over the kept terms, so dL/ds = q - p when nothing is masked."""
    log_ratio = log_p - log_q  # [..., V]; +inf where q_v = 0 < p_v
    left_out = torch.isposinf(log_ratio) if with_grad else None
    p = log_p.exp_()
    value = _finite_or_zero(log_ratio).mul_(p).sum(-1)
    if not with_grad:
        return value, None
    del log_ratio
    return value, _student_grad(p.masked_fill_(left_out, 0.0).neg_(), log_q.exp_())


def _closed_reverse_kl(log_q: Tensor, log_p: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(q || p); G = q (log q - log p + 1) over the kept terms, so dL/ds = q (log q - log p - KL)."""
    log_ratio = log_p.neg_().add_(log_q)  # log q - log p; +inf where p_v = 0 < q_v
    left_out = torch.isposinf(log_ratio) if with_grad else None
    q = log_q.exp_()
    q_log_ratio = _finite_or_zero(log_ratio).mul_(q)  # [..., V]
    value = q_log_ratio.sum(-1)
    if not with_grad:
        return value, None
    return value, _student_grad(q_log_ratio.add_(q).masked_fill_(left_out, 0.0), q)


def _closed_skew_forward_kl(
    log_q: Tensor, log_p: Tensor, with_grad: bool, alpha: float
) -> tuple[Tensor, Tensor | None]:
    """KL(p || m), m = alpha p + (1 - alpha) q; G = -(1 - alpha) p q / m."""
    log_m = _log_mixture_into(log_p, log_q, alpha)  # [..., V]
    log_ratio = log_p - log_m  # [..., V]
    p = log_p.exp_()
    value = _finite_or_zero(log_ratio).mul_(p).sum(-1)
    if not with_grad:
        return value, None
    # q / m is NaN only where p and q are both 0 (-inf - -inf); there p = 0 and the term is 0.
    q_over_m = torch.sub(log_q, log_m, out=log_ratio).exp_()
    grad_log_q = q_over_m.mul_(p).mul_(-(1.0 - alpha)).nan_to_num_(nan=0.0)
    return value, _student_grad(grad_log_q, log_q.exp_())


def _closed_skew_reverse_kl(
    log_q: Tensor, log_p: Tensor, with_grad: bool, alpha: float
) -> tuple[Tensor, Tensor | None]:
    """KL(q || m), m = (1 - alpha) p + alpha q; G = q (log(q / m) + 1 - alpha q / m)."""
    log_m = _log_mixture_into(log_q, log_p, alpha)  # [..., V]
    # 0 where q_v = 0, so that G_v = 0 * finite = 0 there; written over log p, not needed any more
    log_ratio = _finite_or_zero(torch.sub(log_q, log_m, out=log_p))
    q = log_q.exp_()
    grad_log_q = None
    if with_grad:
        grad_log_q = torch.exp(log_ratio, out=log_m).mul_(-alpha).add_(log_ratio).add_(1.0).mul_(q)
    value = log_ratio.mul_(q).sum(-1)
    if not with_grad:
        return value, None
    return value, _student_grad(grad_log_q, q)


def _closed_generalized_jsd(
    log_q: Tensor, log_p: Tensor, with_grad: bool, beta: float
) -> tuple[Tensor, Tensor | None]:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; G = (1 - beta) q log(q / m).

    The terms in d log m cancel (beta p + (1 - beta) q = m), which leaves G; its row sum is (1 - beta)
    KL(q || m), already part of the value, so dL/ds = (1 - beta) q (log(q / m) - KL(q || m)).
    """
    log_m = _log_mixture_into(log_p, log_q, beta)  # [..., V]
    log_ratio_q = _finite_or_zero(log_q - log_m)  # [..., V]
    log_ratio_p = _finite_or_zero(torch.sub(log_p, log_m, out=log_m))  # [..., V]
    q, p = log_q.exp_(), log_p.exp_()
    kl_p = log_ratio_p.mul_(p).sum(-1)  # [...]
    kl_q = torch.mul(q, log_ratio_q, out=log_ratio_p).sum(-1)  # [...]
    value = beta * kl_p + (1.0 - beta) * kl_q
    if not with_grad:
        return value, None
    return value, log_ratio_q.sub_(kl_q.unsqueeze(-1)).mul_(q).mul_(1.0 - beta)


def _closed_total_variation(log_q: Tensor, log_p: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """1/2 sum_v |p_v - q_v|; G = q sign(q - p) / 2 (0 where p_v = q_v, as autograd's abs)."""
    q = log_q.exp_()
    diff = log_p.exp_().sub_(q)  # p - q, [..., V]
    value = 0.5 * diff.abs().sum(-1)
    if not with_grad:
        return value, None
    return value, _student_grad(diff.sign_().mul_(q).mul_(-0.5), q)


# ---- references: autograd through the definitions (teacher gradients, double backward) ----------------


def _reference_forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    return _kl_from_log_probs(_log_probs(teacher_logits), _log_probs(student_logits))


def _reference_reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    return _kl_from_log_probs(_log_probs(student_logits), _log_probs(teacher_logits))


def _reference_skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))


def _reference_skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, alpha))


def _reference_generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    log_p, log_q = _log_probs(teacher_logits), _log_probs(student_logits)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)


def _reference_total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    p, q = _log_probs(teacher_logits).exp(), _log_probs(student_logits).exp()
    return 0.5 * (p - q).abs().sum(-1)


# ---- the registry: one record per divergence ------------------------------------------------------------


@dataclass(frozen=True)
class HyperParameter:
    """A divergence's hyper-parameter: the keyword its function takes, the config field that sets it, its range.

    The range is the interval from ``low`` to ``high``, each end excluded unless ``includes_low`` /
    ``includes_high``. ``distillm.config`` makes one ``objective.<key>`` field of each (default, help, range
    check), so a divergence with a new hyper-parameter needs no edit there.
    """

    argument: str  # the keyword of the divergence: alpha
    key: str  # the objective config field that sets it: skew_alpha
    default: float
    low: float
    high: float
    help: str
    includes_low: bool = False
    includes_high: bool = False

    @property
    def interval(self) -> str:
        """The range as an interval: ``(0, 1)``, ``[0, 1)``, ..."""
        left, right = "[" if self.includes_low else "(", "]" if self.includes_high else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.includes_low else value > self.low
        below = value <= self.high if self.includes_high else value < self.high
        return above and below

    def check(self, value: float, name: str) -> None:
        """Raise ValueError naming ``name`` and the range when ``value`` lies outside it."""
        if not self.contains(value):
            raise ValueError(f"{name} must be in {self.interval}, got {value!r}")


@dataclass(frozen=True)
class Divergence:
    """One divergence: its name, its reference definition, an optional closed form, its hyper-parameters.

    Calling the record computes the divergence, ``(student_logits, teacher_logits, *hyper-parameters)`` ->
    ``[...]``, the hyper-parameters by position or by ``argument`` name, their defaults where left out.

    - ``reference(student_logits, teacher_logits, **hyper) -> [...]``: the definition, written with the
      helpers above (``_log_probs``, ``_kl_from_log_probs``, ``_log_mixture``); autograd through it is the
      gradient wherever no closed form applies, and the tests' reference.
    - ``closed_form(log_q, log_p, with_grad, **hyper) -> (value, d value / d student_logits | None)``:
      optional (see "closed forms" above); without one, the student's gradient is autograd's too.
    - ``definition``: the formula in one line, for ``--help`` and the docs.
    """

    name: str
    definition: str
    reference: Callable[..., Tensor]
    closed_form: Callable[..., tuple[Tensor, Tensor | None]] | None = None
    parameters: tuple[HyperParameter, ...] = ()

    def __repr__(self) -> str:
        return f"Divergence({self.name!r})"

    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, *values: float, **named: float
    ) -> Tensor:
        hyper = self._arguments(values, named)
        reference = partial(self.reference, **hyper) if hyper else self.reference
        closed_form = self.closed_form
        if closed_form is not None and hyper:
            closed_form = partial(closed_form, **hyper)
        return _divergence(student_logits, teacher_logits, reference, closed_form)

    def bind(self, **values: float) -> Callable[[Tensor, Tensor], Tensor]:
        """``(student_logits, teacher_logits) -> [...]`` with the hyper-parameters given by config key.

        Keys of other divergences' hyper-parameters are ignored; a missing one takes its default.
        """
        hyper = {}
        for parameter in self.parameters:
            value = values.get(parameter.key, parameter.default)
            parameter.check(value, parameter.key)
            hyper[parameter.argument] = value
        return partial(self, **hyper) if hyper else self

    def _arguments(self, values: tuple[float, ...], named: dict[str, float]) -> dict[str, float]:
        """The hyper-parameters by ``argument`` name, from positional and keyword values, checked."""
        if len(values) > len(self.parameters):
            raise TypeError(f"{self.name} takes {len(self.parameters)} hyper-parameter(s), got {len(values)}")
        known = [parameter.argument for parameter in self.parameters]
        unknown = sorted(set(named) - set(known))
        if unknown:
            raise TypeError(f"{self.name} has no hyper-parameter {unknown[0]!r}; it takes: {known or 'none'}")
        hyper = {}
        for position, parameter in enumerate(self.parameters):
            value = (
                values[position]
                if position < len(values)
                else named.get(parameter.argument, parameter.default)
            )
            parameter.check(value, parameter.argument)
            hyper[parameter.argument] = value
        return hyper


def _registry(*divergences: Divergence) -> dict[str, Divergence]:
    registry: dict[str, Divergence] = {}
    for divergence in divergences:
        if divergence.name in registry:
            raise ValueError(f"divergence {divergence.name!r} is registered twice")
        registry[divergence.name] = divergence
    return registry


SKEW_ALPHA = HyperParameter(
    argument="alpha",
    key="skew_alpha",
    default=0.1,
    low=0.0,
    high=1.0,
    help="alpha of the skew divergences (the paper's 0.1).",
)
JSD_BETA = HyperParameter(
    argument="beta",
    key="jsd_beta",
    default=0.5,
    low=0.0,
    high=1.0,
    help="beta of the generalized JSD, m = beta p + (1 - beta) q (GKD's convention).",
)

# To add a divergence: write its reference above (and its closed form, if the memory matters), add its record
# here, and its float64 definition to DEFINITIONS in tests/test_divergences.py (one line). Config validation,
# `distillm train --help`, get_divergence and the tests' cases all read this table.
DIVERGENCES: dict[str, Divergence] = _registry(
    Divergence(
        name="forward_kl",
        definition="KL(p || q), the teacher-weighted KL of classic KD",
        reference=_reference_forward_kl,
        closed_form=_closed_forward_kl,
    ),
    Divergence(
        name="reverse_kl",
        definition="KL(q || p), mode-seeking (MiniLLM's objective, token level)",
        reference=_reference_reverse_kl,
        closed_form=_closed_reverse_kl,
    ),
    Divergence(
        name="skew_forward_kl",
        definition="KL(p || alpha p + (1 - alpha) q), DistiLLM's SKL; alpha -> 0 recovers forward_kl",
        reference=_reference_skew_forward_kl,
        closed_form=_closed_skew_forward_kl,
        parameters=(SKEW_ALPHA,),
    ),
    Divergence(
        name="skew_reverse_kl",
        definition="KL(q || (1 - alpha) p + alpha q), DistiLLM's SRKL; alpha -> 0 recovers reverse_kl",
        reference=_reference_skew_reverse_kl,
        closed_form=_closed_skew_reverse_kl,
        parameters=(SKEW_ALPHA,),
    ),
    Divergence(
        name="generalized_jsd",
        definition="beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (GKD's convention)",
        reference=_reference_generalized_jsd,
        closed_form=_closed_generalized_jsd,
        parameters=(JSD_BETA,),
    ),
    Divergence(
        name="total_variation",
        definition="1/2 sum_v |p_v - q_v|, in [0, 1]",
        reference=_reference_total_variation,
        closed_form=_closed_total_variation,
    ),
)
"""Name -> :class:`Divergence`, the names configs use; each record is callable like a function."""


def _hyper_parameters() -> dict[str, HyperParameter]:
    found: dict[str, HyperParameter] = {}
    for divergence in DIVERGENCES.values():
        for parameter in divergence.parameters:
            if found.setdefault(parameter.key, parameter) != parameter:
                raise ValueError(f"two different hyper-parameters are set by objective.{parameter.key}")
    return found


HYPER_PARAMETERS: dict[str, HyperParameter] = _hyper_parameters()
"""Config key -> hyper-parameter, over every registered divergence: one ``objective.<key>`` field each."""

forward_kl = DIVERGENCES["forward_kl"]
reverse_kl = DIVERGENCES["reverse_kl"]
skew_forward_kl = DIVERGENCES["skew_forward_kl"]
skew_reverse_kl = DIVERGENCES["skew_reverse_kl"]
generalized_jsd = DIVERGENCES["generalized_jsd"]
total_variation = DIVERGENCES["total_variation"]


def get_divergence(name: str, **values: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The divergence called ``name``, its hyper-parameters bound: ``(student_logits, teacher_logits)``.

    ``values`` are given by config key (``skew_alpha=0.1``, ``jsd_beta=0.5``: see ``HYPER_PARAMETERS``);
    the divergence takes those it has, their defaults where left out, and ignores the others'.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    unknown = sorted(set(values) - set(HYPER_PARAMETERS))
    if unknown:
        raise TypeError(
            f"unknown divergence hyper-parameter {unknown[0]!r}; known: {sorted(HYPER_PARAMETERS)}"
        )
    return DIVERGENCES[name].bind(**values)
