"""The closed-form student gradients against autograd through the definitions (each record's ``reference``),
and the cases that must fall back to autograd: a teacher that needs a gradient, double backward."""

from __future__ import annotations

import math

import pytest
import torch

from divergence_cases import bound, cases

# (id, the public function, the autograd reference with the same hyper-parameters): every registered
# divergence that has a closed form, from the registry.
CASES = [
    (label, bound(divergence, values), bound(divergence.reference, values))
    for label, divergence, values in cases(closed_form_only=True)
]
IDS = [case[0] for case in CASES]
V = 12
MASKS = {  # columns set to -inf on (student, teacher)
    "none": ([], []),
    "teacher only": ([], [2, 7]),
    "student only": ([3, 7], []),
    "both, same columns": ([5, 9], [5, 9]),
    "both, overlapping": ([1, 4, 6], [4, 6, 10]),
}


def _logits(shape, scale, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def _pair(kind: str, mask: str, dtype=torch.float32, shape=(6, V)):
    """Student and teacher logits: 'random' (scale 2) or 'peaked' (scale 12: near one-hot rows, many
    probabilities that underflow in float32), with the mask's columns at -inf."""
    scale = 2.0 if kind == "random" else 12.0
    student, teacher = _logits(shape, scale, 1, dtype), _logits(shape, scale, 2, dtype)
    student_cols, teacher_cols = MASKS[mask]
    student[..., student_cols] = -math.inf
    teacher[..., teacher_cols] = -math.inf
    return student, teacher


def _value_and_student_grad(fn, student, teacher, upstream):
    s = student.clone().requires_grad_()
    value = fn(s, teacher)
    (grad,) = torch.autograd.grad(value, s, upstream)
    return value, grad


def _largest_term(student, teacher) -> float:
    """1 + max_v (p_v + q_v) |log q_v - log p_v|: the size of the terms a gradient is summed from (~40 on
    peaked rows, whose gradients are as small as 1e-4)."""
    log_q, log_p = student.double().log_softmax(-1), teacher.double().log_softmax(-1)
    log_ratio = (log_q - log_p).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return 1.0 + ((log_q.exp() + log_p.exp()) * log_ratio.abs()).max().item()


def _upstream(shape, dtype):
    return torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_values_and_student_gradients_equal_autograd_through_the_definition(
    name, fn, reference, dtype, kind, mask
):
    student, teacher = _pair(kind, mask, dtype)
    upstream = _upstream(student.shape[:-1], dtype)
    value, grad = _value_and_student_grad(fn, student, teacher, upstream)
    want_value, want_grad = _value_and_student_grad(reference, student, teacher, upstream)
    assert value.dtype == want_value.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)  # the same operations: bit for bit
    # Both are float computations of the same gradient, summing the same terms in other orders: they may
    # differ by a few roundings of the largest term, whatever the (often much smaller) gradient.
    tol = 16 * torch.finfo(dtype).eps * _largest_term(student, teacher)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=tol)
    assert torch.isfinite(grad).all()
    masked_in_student = MASKS[mask][0]
    assert (grad[:, masked_in_student] == 0).all()  # a -inf logit gets no gradient


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_gradcheck_in_float64(name, fn, reference):
    student, teacher = _pair("random", "none", torch.float64, shape=(3, 7))
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher), (student.requires_grad_(),))


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_gradcheck_in_float64_with_masked_entries(name, fn, reference):
    # the -inf columns are excluded from the perturbation: only finite logits are checked
    student, teacher = _pair("random", "both, overlapping", torch.float64, shape=(3, V))
    finite = torch.isfinite(student)

    def on_finite(values):
        full = student.masked_scatter(finite, values)
        return fn(full, teacher)

    assert torch.autograd.gradcheck(on_finite, (student[finite].clone().requires_grad_(),))


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_a_teacher_that_needs_a_gradient_gets_the_reference_gradient(name, fn, reference):
    student, teacher = _pair("random", "teacher only", torch.float32)
    upstream = _upstream(student.shape[:-1], torch.float32)
    grads = []
    for f in (fn, reference):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        value = f(s, t)
        assert value.grad_fn is not None and "StudentGradient" not in type(value.grad_fn).__name__
        grads.append(torch.autograd.grad(value, [s, t], upstream))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mask", ["none", "both, overlapping"])
@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_double_backward_gives_the_reference_second_derivatives(name, fn, reference, mask):
    student, teacher = _pair("random", mask, torch.float64, shape=(3, V))
    direction = _logits((3, V), 1.0, 4, torch.float64)
    hessian_vector = []
    for f in (fn, reference):
        s = student.clone().requires_grad_()
        (grad,) = torch.autograd.grad(f(s, teacher).sum(), s, create_graph=True)
        (hv,) = torch.autograd.grad((grad * direction).sum(), s)
        hessian_vector.append(hv)
    # With -inf logits the reference's own second derivatives hold NaN (where/logaddexp at -inf are not
    # twice differentiable there); the fallback reproduces them, NaN included, rather than change them.
    torch.testing.assert_close(hessian_vector[0], hessian_vector[1], rtol=1e-10, atol=1e-12, equal_nan=True)
    if mask == "none":
        assert torch.isfinite(hessian_vector[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_half_precision_logits_give_float32_values_and_gradients_in_their_dtype(name, fn, reference, dtype):
    student, teacher = _pair("random", "both, overlapping", dtype)
    upstream = _upstream(student.shape[:-1], torch.float32)
    value, grad = _value_and_student_grad(fn, student, teacher, upstream)
    want_value, want_grad = _value_and_student_grad(reference, student, teacher, upstream)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    # both are the same float32 gradient rounded once to the input dtype: at most one ulp apart
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_any_leading_shape_is_the_same_as_flat_rows(name, fn, reference):
    student, teacher = _pair("random", "student only", torch.float32, shape=(2, 3, 4, V))
    upstream = _upstream((2, 3, 4), torch.float32)
    value, grad = _value_and_student_grad(fn, student, teacher, upstream)
    flat_value, flat_grad = _value_and_student_grad(
        fn, student.reshape(-1, V), teacher.reshape(-1, V), upstream.reshape(-1)
    )
    assert value.shape == (2, 3, 4) and grad.shape == student.shape
    torch.testing.assert_close(value.reshape(-1), flat_value, rtol=0, atol=0)
    torch.testing.assert_close(grad.reshape(-1, V), flat_grad, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_values_without_gradients_equal_the_reference(name, fn, reference):
    student, teacher = _pair("peaked", "both, overlapping", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fn(student, teacher), reference(student, teacher), rtol=0, atol=0)
    assert not fn(student, teacher).requires_grad


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_a_teacher_from_inference_mode_works_with_and_without_create_graph(name, fn, reference):
    student, teacher = _pair("random", "none", torch.float64, shape=(3, V))
    with torch.inference_mode():
        frozen_teacher = teacher.clone()
    for create_graph in (False, True):
        s = student.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(s, frozen_teacher).sum(), s, create_graph=create_graph)
        s_ref = student.clone().requires_grad_()
        (want,) = torch.autograd.grad(reference(s_ref, teacher).sum(), s_ref)
        torch.testing.assert_close(grad.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "fn", "reference"), CASES, ids=IDS)
def test_only_the_student_gradient_is_saved_for_backward(name, fn, reference):
    # Besides the inputs themselves (kept by reference, not copied), one float32 [N, V] tensor is saved.
    student, teacher = _pair("random", "none", torch.float32)
    s = student.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(s, teacher)
    copies = [t for t in saved if t is not s and t is not teacher]
    assert len(copies) == 1 and copies[0].shape == student.shape and copies[0].dtype == torch.float32
