"""Each divergence against its float64 probability-space definition, in value and gradient, plus limits,
properties and -inf (masked vocabulary) handling."""

from __future__ import annotations

import math
import re

import pytest
import torch

from distillm.losses import (
    DIVERGENCES,
    HYPER_PARAMETERS,
    Divergence,
    HyperParameter,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from distillm.losses import divergences as div
from divergence_cases import bound, cases
from numerics import rounding_bound

# ---- float64 references, straight from the formulas (0 log 0 = 0) -------------------------------------


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v log(a_v / b_v) in probability space, with 0 log 0 = 0."""
    safe_b = torch.where(a > 0, b, 1.0)
    safe_a = torch.where(a > 0, a, 1.0)
    return torch.where(a > 0, a * (safe_a / safe_b).log(), 0.0).sum(-1)


def _probs(student, teacher):
    return student.double().softmax(-1), teacher.double().softmax(-1)  # q, p


# name -> the divergence in probability space, float64 (q: the student, p: the teacher), one entry each. Every
# registered divergence must have its entry: the cases of this file and test_divergences_fused.py come from the
# registry (tests/divergence_cases.py).
DEFINITIONS = {
    "forward_kl": lambda q, p: _kl(p, q),
    "reverse_kl": lambda q, p: _kl(q, p),
    "skew_forward_kl": lambda q, p, alpha: _kl(p, alpha * p + (1 - alpha) * q),
    "skew_reverse_kl": lambda q, p, alpha: _kl(q, (1 - alpha) * p + alpha * q),
    "generalized_jsd": lambda q, p, beta: (
        beta * _kl(p, beta * p + (1 - beta) * q) + (1 - beta) * _kl(q, beta * p + (1 - beta) * q)
    ),
    "total_variation": lambda q, p: 0.5 * (p - q).abs().sum(-1),
}


def definition(name, **values):
    """(student_logits, teacher_logits) -> the float64 definition of ``name`` at ``values``."""
    return lambda student, teacher: DEFINITIONS[name](*_probs(student, teacher), **values)


def ref_forward_kl(student, teacher):
    return definition("forward_kl")(student, teacher)


def ref_reverse_kl(student, teacher):
    return definition("reverse_kl")(student, teacher)


def ref_skew_forward_kl(student, teacher, alpha):
    return definition("skew_forward_kl", alpha=alpha)(student, teacher)


def ref_skew_reverse_kl(student, teacher, alpha):
    return definition("skew_reverse_kl", alpha=alpha)(student, teacher)


def ref_generalized_jsd(student, teacher, beta):
    return definition("generalized_jsd", beta=beta)(student, teacher)


def ref_total_variation(student, teacher):
    return definition("total_variation")(student, teacher)


CASES = [  # (id, our divergence with its hyper-parameters bound, its float64 definition), from the registry
    (label, bound(divergence, values), definition(divergence.name, **values))
    for label, divergence, values in cases()
]
IDS = [case[0] for case in CASES]


def _logits(*shape, scale=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator)


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_divergence_matches_its_float64_definition(name, fn, ref):
    student, teacher = _logits(3, 4, 11, seed=1), _logits(3, 4, 11, seed=2)
    out = fn(student, teacher)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref(student, teacher), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_gradients_match_autograd_of_the_definition(name, fn, ref):
    student, teacher = _logits(5, 13, seed=3), _logits(5, 13, seed=4)
    weights = torch.rand(5, dtype=torch.float64)  # a generic upstream gradient
    s32, t32 = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    ours = torch.autograd.grad((fn(s32, t32).double() * weights).sum(), [s32, t32])
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    expected = torch.autograd.grad((ref(s64, t64) * weights).sum(), [s64, t64])
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_skew_divergences_tend_to_plain_kl_as_alpha_tends_to_zero():
    student, teacher = _logits(6, 17, seed=5), _logits(6, 17, seed=6)
    for skew, plain in ((skew_forward_kl, forward_kl), (skew_reverse_kl, reverse_kl)):
        gaps = [
            (skew(student, teacher, alpha) - plain(student, teacher)).abs().max()
            for alpha in (1e-2, 1e-4, 1e-6)
        ]
        assert gaps[0] > gaps[1] > gaps[2]
        torch.testing.assert_close(
            skew(student, teacher, 1e-9), plain(student, teacher), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_identical_distributions_give_zero(name, fn, ref):
    logits = _logits(4, 9, seed=7)
    shifted = logits + 3.0  # same softmax
    torch.testing.assert_close(fn(logits, shifted), torch.zeros(4), rtol=0, atol=2e-6)


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_divergences_are_non_negative(name, fn, ref):
    student, teacher = _logits(64, 21, scale=4.0, seed=8), _logits(64, 21, scale=4.0, seed=9)
    assert (fn(student, teacher) >= -1e-6).all()


def test_total_variation_lies_in_the_unit_interval_and_reaches_one_on_disjoint_supports():
    student, teacher = _logits(64, 21, scale=5.0, seed=10), _logits(64, 21, scale=5.0, seed=11)
    tv = total_variation(student, teacher)
    assert ((tv >= 0) & (tv <= 1)).all()
    disjoint_s = torch.tensor([[30.0, -30.0]])
    disjoint_t = torch.tensor([[-30.0, 30.0]])
    torch.testing.assert_close(total_variation(disjoint_s, disjoint_t), torch.ones(1))


def test_jsd_at_half_is_symmetric_in_its_arguments():
    student, teacher = _logits(7, 15, seed=12), _logits(7, 15, seed=13)
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), generalized_jsd(teacher, student, 0.5))
    assert generalized_jsd(student, teacher, 0.5).max() <= math.log(2) + 1e-6  # JSD is bounded by log 2


def test_jsd_is_beta_weighted_skew_kl_plus_skew_reverse_kl():
    # The paper's identity JSD(b) = b SKL^(b) + (1 - b) SRKL^(1 - b).
    student, teacher = _logits(7, 15, seed=14), _logits(7, 15, seed=15)
    beta = 0.3
    combined = beta * skew_forward_kl(student, teacher, beta) + (1 - beta) * skew_reverse_kl(
        student, teacher, 1 - beta
    )
    torch.testing.assert_close(generalized_jsd(student, teacher, beta), combined)


def test_original_js_distance_with_lam_09_equals_beta_01():
    # DistiLLM's js_distance: m = (1 - lam) p + lam q; lam KL(q || m) + (1 - lam) KL(p || m).
    student, teacher = _logits(5, 12, seed=16), _logits(5, 12, seed=17)
    q, p = _probs(student, teacher)
    lam = 0.9
    m = (1 - lam) * p + lam * q
    original = lam * _kl(q, m) + (1 - lam) * _kl(p, m)
    torch.testing.assert_close(
        generalized_jsd(student, teacher, 0.1).double(), original, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_bf16_inputs_give_float32_results(name, fn, ref):
    student, teacher = _logits(3, 10, seed=18).bfloat16(), _logits(3, 10, seed=19).bfloat16()
    out = fn(student, teacher)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref(student.float(), teacher.float()), rtol=1e-5, atol=1e-6)


# ---- -inf logits: masked vocabulary entries --------------------------------------------------------------


def _masked(logits, columns):
    out = logits.clone()
    out[..., columns] = -math.inf
    return out


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_entries_masked_in_both_are_the_same_as_dropping_them(name, fn, ref):
    student, teacher = _logits(4, 10, seed=20), _logits(4, 10, seed=21)
    kept = [0, 1, 3, 4, 6, 8, 9]
    s = _masked(student, [2, 5, 7]).requires_grad_()
    t = _masked(teacher, [2, 5, 7]).requires_grad_()
    out = fn(s, t)
    s_grad, t_grad = torch.autograd.grad(out.sum(), [s, t])

    s_kept = student[:, kept].clone().requires_grad_()
    t_kept = teacher[:, kept].clone().requires_grad_()
    expected = fn(s_kept, t_kept)
    s_kept_grad, t_kept_grad = torch.autograd.grad(expected.sum(), [s_kept, t_kept])

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.double(), ref(student[:, kept], teacher[:, kept]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_grad[:, kept], s_kept_grad)
    torch.testing.assert_close(t_grad[:, kept], t_kept_grad)
    assert (s_grad[:, [2, 5, 7]] == 0).all() and (t_grad[:, [2, 5, 7]] == 0).all()


@pytest.mark.parametrize("masked_side", ["student", "teacher"])
@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_entries_masked_on_one_side_give_finite_values_and_gradients(name, fn, ref, masked_side):
    student, teacher = _logits(4, 10, seed=22), _logits(4, 10, seed=23)
    # column 1 masked on one side only, column 4 on both
    if masked_side == "student":
        student = _masked(_masked(student, [1]), [4])
        teacher = _masked(teacher, [4])
    else:
        teacher = _masked(_masked(teacher, [1]), [4])
        student = _masked(student, [4])
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    out = fn(s, t)
    grads = torch.autograd.grad(out.sum(), [s, t])
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    if not name.endswith("_kl") or name.startswith("skew"):
        # mixtures and TVD are finite by definition: compare with the float64 definition (0 log 0 = 0)
        torch.testing.assert_close(out.double(), ref(student, teacher), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl])
def test_plain_kl_with_a_zero_denominator_sums_over_the_shared_support(divergence):
    # KL(p || q) with q_v = 0 < p_v is infinite; the documented convention drops such entries.
    student, teacher = _logits(3, 8, seed=24), _logits(3, 8, seed=25)
    if divergence is forward_kl:
        student = _masked(student, [3])
        weight_probs, other_probs = teacher.double().softmax(-1), student.double().softmax(-1)
    else:
        teacher = _masked(teacher, [3])
        weight_probs, other_probs = student.double().softmax(-1), teacher.double().softmax(-1)
    shared = [0, 1, 2, 4, 5, 6, 7]
    expected = (weight_probs[:, shared] * (weight_probs[:, shared] / other_probs[:, shared]).log()).sum(-1)
    torch.testing.assert_close(divergence(student, teacher).double(), expected, rtol=1e-5, atol=1e-6)


def test_extreme_logits_do_not_underflow_the_mixture_into_nan():
    # Probabilities that underflow to 0 in both distributions made the original log(mixture) give 0 * -inf.
    student = torch.tensor([[0.0, -200.0, -300.0]])
    teacher = torch.tensor([[0.0, -300.0, -200.0]])
    for fn in (lambda s, t: skew_forward_kl(s, t), lambda s, t: skew_reverse_kl(s, t), generalized_jsd):
        s = student.clone().requires_grad_()
        out = fn(s, teacher)
        (grad,) = torch.autograd.grad(out.sum(), [s])
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(out, torch.zeros(1), atol=1e-6, rtol=0)


# ---- registry ----------------------------------------------------------------------------------------------


def test_registry_names_the_six_divergences():
    # at least these six (presets and docs name them); a new divergence only adds to them
    assert set(DIVERGENCES) >= {
        "forward_kl",
        "reverse_kl",
        "skew_forward_kl",
        "skew_reverse_kl",
        "generalized_jsd",
        "total_variation",
    }


def test_get_divergence_binds_the_hyper_parameter_each_needs():
    student, teacher = _logits(2, 9, seed=26), _logits(2, 9, seed=27)
    bound = {name: get_divergence(name, skew_alpha=0.3, jsd_beta=0.2) for name in DIVERGENCES}
    torch.testing.assert_close(
        bound["skew_forward_kl"](student, teacher), ref_skew_forward_kl(student, teacher, 0.3).float()
    )
    torch.testing.assert_close(
        bound["skew_reverse_kl"](student, teacher), ref_skew_reverse_kl(student, teacher, 0.3).float()
    )
    torch.testing.assert_close(
        bound["generalized_jsd"](student, teacher), ref_generalized_jsd(student, teacher, 0.2).float()
    )
    torch.testing.assert_close(
        bound["forward_kl"](student, teacher), ref_forward_kl(student, teacher).float()
    )


def test_unknown_names_and_out_of_range_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="skew_reverse_kl"):
        get_divergence("srkl")
    with pytest.raises(ValueError, match="skew_alpha"):
        get_divergence("skew_forward_kl", skew_alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(torch.zeros(1, 3), torch.zeros(1, 3), beta=0.0)


def test_every_registered_divergence_has_its_float64_definition_in_this_file():
    assert set(DEFINITIONS) == set(DIVERGENCES), "add the new divergence's one-line definition to DEFINITIONS"


def _identity_bound(logits: torch.Tensor) -> torch.Tensor:
    """How far from 0 a float64 divergence of a distribution with itself may come out, per row.

    Each log ratio passes through at most 8 roundings (log-softmax, the mixture's shift and logaddexp, the
    difference) of values of size |log p_v| + 1, and the row sums V such terms weighted by p_v: Higham's
    gamma_(V + 8) times sum_v (p_v + 1 / V) (|log p_v| + 1) bounds it (the 1 / V covers the total variation's
    unweighted differences).
    """
    log_p = logits.log_softmax(-1)
    magnitude = ((log_p.exp() + 1 / logits.shape[-1]) * (log_p.abs() + 1)).sum(-1)
    return rounding_bound(torch.float64, logits.shape[-1] + 8, 1.0) * magnitude


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_every_registered_divergence_is_zero_between_a_distribution_and_itself_in_float64(name, fn, ref):
    logits = _logits(16, 11, seed=40).double()
    shifted = logits + 3.0  # the same distribution, other rounding
    for teacher in (logits.clone(), shifted):
        value = fn(logits, teacher)
        assert value.dtype == torch.float64
        assert (value.abs() <= _identity_bound(logits)).all(), value.abs().max()


@pytest.mark.parametrize(("name", "fn", "ref"), CASES, ids=IDS)
def test_every_registered_divergence_is_non_negative_in_float64(name, fn, ref):
    student, teacher = (
        _logits(256, 13, scale=4.0, seed=41).double(),
        _logits(256, 13, scale=4.0, seed=42).double(),
    )
    # The exact value is >= 0; rounding may take a near-zero one below by the identity bound's size at most.
    bound_ = torch.maximum(_identity_bound(student), _identity_bound(teacher))
    assert (fn(student, teacher) >= -bound_).all()


def test_a_divergence_registered_without_a_closed_form_is_differentiated_through_its_reference():
    # The same record as forward_kl, less the closed form: values and gradients are autograd's through the
    # reference, bit for bit (the very same operations).
    plain = Divergence(
        name="forward_kl_autograd", definition="KL(p || q)", reference=div._reference_forward_kl
    )
    student, teacher = _logits(5, 13, seed=43), _logits(5, 13, seed=44)
    s, s_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
    value, expected = plain(s, teacher), div._reference_forward_kl(s_ref, teacher)
    assert "StudentGradient" not in type(value.grad_fn).__name__
    (grad,) = torch.autograd.grad(value.sum(), s)
    (want,) = torch.autograd.grad(expected.sum(), s_ref)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    torch.testing.assert_close(value.double(), ref_forward_kl(student, teacher), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_hyper_parameters_are_checked_by_position_and_by_name_against_their_range(name):
    divergence = DIVERGENCES[name]
    student, teacher = _logits(2, 5, seed=45), _logits(2, 5, seed=46)
    with pytest.raises(TypeError, match=name):
        divergence(student, teacher, not_a_parameter=0.5)
    with pytest.raises(TypeError, match=name):
        divergence(student, teacher, *[0.5] * (len(divergence.parameters) + 1))
    for parameter in divergence.parameters:
        outside = parameter.high + 1.0 if math.isfinite(parameter.high) else parameter.low - 1.0
        interval = re.escape(parameter.interval)
        with pytest.raises(ValueError, match=rf"{parameter.argument} must be in {interval}"):
            divergence(student, teacher, **{parameter.argument: outside})
        with pytest.raises(ValueError, match=rf"{parameter.key} must be in {interval}"):
            get_divergence(name, **{parameter.key: outside})


def test_get_divergence_rejects_a_hyper_parameter_no_divergence_has():
    with pytest.raises(TypeError, match="skew_beta"):
        get_divergence("skew_forward_kl", skew_beta=0.3)


def test_hyper_parameter_intervals_say_which_ends_they_include():
    half_open = HyperParameter(
        argument="a", key="k", default=0.5, low=0.0, high=1.0, help="h", includes_low=True
    )
    assert half_open.interval == "[0, 1)"
    assert half_open.contains(0.0) and not half_open.contains(1.0)
    assert HYPER_PARAMETERS["skew_alpha"].interval == "(0, 1)"
