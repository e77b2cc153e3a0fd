"""The chunked objective against the dense objective written out by hand: loss and gradients, fp32 and bf16,
masks, all-masked batches, uneven chunk sizes, and both ways of giving the teacher."""

from __future__ import annotations

import math

import pytest
import torch

from distillm import IGNORE_INDEX
from distillm.losses import DIVERGENCES, chunked_distillation_loss, get_divergence
from numerics import assert_as_accurate_as

V, H, HT = 23, 8, 6


def _inputs(shape=(37,), dtype=torch.float32, seed=0, bias=True, masked_every=3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=generator).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=generator)).to(dtype).requires_grad_()
    head_bias = (0.5 * torch.randn(V, generator=generator)).to(dtype).requires_grad_() if bias else None
    teacher_hidden = torch.randn(*shape, HT, generator=generator).to(dtype)
    teacher_weight = torch.randn(V, HT, generator=generator).to(dtype)
    teacher_bias = torch.randn(V, generator=generator).to(dtype)
    labels = torch.randint(0, V, shape, generator=generator)
    labels.view(-1)[::masked_every] = IGNORE_INDEX
    return hidden, weight, head_bias, teacher_hidden, teacher_weight, teacher_bias, labels


def _dense(hidden, weight, head_bias, labels, divergence, kd_ratio, num_tokens, teacher_logits):
    """The objective written out on full logits, from the definitions: no code shared with chunked.py."""
    logits = hidden @ weight.T + (0 if head_bias is None else head_bias)  # [..., V], full
    log_q = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(
        -1
    )  # float64 stays float64
    mask = labels != IGNORE_INDEX
    ce = -log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [...]
    ce_sum = (ce * mask).sum()
    div_sum = divergence(logits, teacher_logits)[mask].sum() if divergence is not None else torch.zeros(())
    denominator = max(num_tokens, 1)
    total = ((1 - kd_ratio) * ce_sum + kd_ratio * div_sum) / denominator
    return total, ce_sum.detach() / denominator, div_sum.detach() / denominator


def _grads(total, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(total, tensors)


def _assert_like_dense(
    parts,
    student,
    labels,
    divergence,
    kd_ratio,
    num_tokens,
    teacher_logits,
    exact_teacher_logits=None,
    precision=None,
):
    """The chunked ``parts`` are as accurate as the dense objective in the inputs' dtype, both against float64.

    ``student`` is ``(hidden, weight, head_bias)``; the chunks sum the vocabulary and the tokens in another order
    than the dense path, so neither is exact (tests/numerics.py). ``exact_teacher_logits``: the teacher's logits
    in float64 when the chunks compute them from hidden states (their rounding is then part of the error);
    by default the given ``teacher_logits`` widened.
    """
    baseline = _dense(*student, labels, divergence, kd_ratio, num_tokens, teacher_logits)
    exact = [None if t is None else t.detach().double().requires_grad_() for t in student]
    if exact_teacher_logits is None:
        exact_teacher_logits = teacher_logits.double()
    reference = _dense(*exact, labels, divergence, kd_ratio, num_tokens, exact_teacher_logits)
    for name, got, base, want in zip(("total", "ce", "divergence"), parts, baseline, reference):
        assert_as_accurate_as(got.detach(), base.detach(), want.detach(), precision=precision, msg=name)
    grads = _grads(parts.total, student)
    for got, base, want in zip(grads, _grads(baseline[0], student), _grads(reference[0], exact)):
        assert_as_accurate_as(got, base, want, precision=precision, msg="gradient")
    return grads


@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunked_matches_dense_in_loss_and_gradients_in_fp32(name, teacher_as):
    hidden, weight, head_bias, t_hidden, t_weight, t_bias, labels = _inputs()
    teacher_logits = t_hidden @ t_weight.T + t_bias
    divergence = get_divergence(name, skew_alpha=0.2, jsd_beta=0.3)
    num_tokens = 40  # the step's token count, larger than this micro-batch's
    teacher = (
        {"teacher_logits": teacher_logits}
        if teacher_as == "logits"
        else {"teacher_hidden": t_hidden, "teacher_head_weight": t_weight, "teacher_head_bias": t_bias}
    )
    parts = chunked_distillation_loss(
        hidden, weight, labels, divergence, 0.7, num_tokens, chunk_size=5, lm_head_bias=head_bias, **teacher
    )
    exact_teacher = (
        t_hidden.double() @ t_weight.double().T + t_bias.double() if teacher_as == "hidden" else None
    )
    student = (hidden, weight, head_bias)
    _assert_like_dense(parts, student, labels, divergence, 0.7, num_tokens, teacher_logits, exact_teacher)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
def test_chunk_sizes_that_do_not_divide_the_token_count_give_the_same_result(chunk_size):
    hidden, weight, head_bias, t_hidden, t_weight, _, labels = _inputs(seed=1)
    divergence = get_divergence("skew_forward_kl")
    teacher_logits = t_hidden @ t_weight.T
    parts = chunked_distillation_loss(
        hidden, weight, labels, divergence, 1.0, None, teacher_logits=teacher_logits, chunk_size=chunk_size
    )
    num_tokens = int((labels != IGNORE_INDEX).sum())
    _assert_like_dense(parts, (hidden, weight, None), labels, divergence, 1.0, num_tokens, teacher_logits)


@pytest.mark.parametrize("name", ["skew_reverse_kl", "forward_kl", "generalized_jsd"])
def test_chunked_matches_dense_in_bf16_within_bf16_tolerance(name):
    hidden, weight, head_bias, t_hidden, t_weight, t_bias, labels = _inputs(dtype=torch.bfloat16, seed=2)
    divergence = get_divergence(name)
    parts = chunked_distillation_loss(
        hidden,
        weight,
        labels,
        divergence,
        0.5,
        None,
        teacher_hidden=t_hidden,
        teacher_head_weight=t_weight,
        teacher_head_bias=t_bias,
        chunk_size=8,
        lm_head_bias=head_bias,
    )
    num_tokens = int((labels != IGNORE_INDEX).sum())
    teacher_logits = t_hidden @ t_weight.T + t_bias  # bf16, as the chunks compute it
    assert parts.total.dtype == torch.float32
    # Both paths round the head's products and the gradients to bf16, so the chunked one is as accurate as the
    # dense one in bf16, or within one bf16 ulp of the float32 loss (its logits carry 8 bits); the float64
    # reference takes the same bf16 inputs, exactly widened.
    student = (hidden, weight, head_bias)
    exact_teacher = t_hidden.double() @ t_weight.double().T + t_bias.double()
    grads = _assert_like_dense(
        parts, student, labels, divergence, 0.5, num_tokens, teacher_logits, exact_teacher, torch.bfloat16
    )
    assert all(g.dtype == torch.bfloat16 for g in grads)


def test_batch_and_time_axes_are_flattened_and_gradients_keep_their_shape():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(shape=(3, 5), seed=3, bias=False)
    divergence = get_divergence("reverse_kl")
    teacher_logits = t_hidden @ t_weight.T  # [3, 5, V]
    parts = chunked_distillation_loss(
        hidden, weight, labels, divergence, 1.0, 20, teacher_logits=teacher_logits, chunk_size=4
    )
    grad_hidden, _ = _assert_like_dense(
        parts, (hidden, weight, None), labels, divergence, 1.0, 20, teacher_logits
    )
    assert grad_hidden.shape == (3, 5, H)
    assert (
        grad_hidden.view(-1, H)[labels.view(-1) == IGNORE_INDEX] == 0
    ).all()  # unsupervised rows: no gradient


def test_all_masked_batch_gives_zero_loss_and_zero_finite_gradients():
    hidden, weight, head_bias, t_hidden, t_weight, _, labels = _inputs(seed=4)
    labels.fill_(IGNORE_INDEX)
    for num_tokens in (None, 0, 12):
        parts = chunked_distillation_loss(
            hidden,
            weight,
            labels,
            get_divergence("skew_reverse_kl"),
            0.5,
            num_tokens,
            teacher_hidden=t_hidden,
            teacher_head_weight=t_weight,
            lm_head_bias=head_bias,
        )
        assert parts.total.item() == parts.ce.item() == parts.divergence.item() == 0.0
        for grad in _grads(parts.total, [hidden, weight, head_bias]):
            assert torch.equal(grad, torch.zeros_like(grad))


def test_only_supervised_rows_are_computed_and_never_more_than_chunk_size_at_once():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(seed=5)
    seen_rows = []

    def spying_divergence(student_logits, teacher_logits):
        seen_rows.append(student_logits.shape[0])
        assert teacher_logits.shape == student_logits.shape
        return DIVERGENCES["reverse_kl"](student_logits, teacher_logits)

    parts = chunked_distillation_loss(
        hidden,
        weight,
        labels,
        spying_divergence,
        1.0,
        None,
        teacher_hidden=t_hidden,
        teacher_head_weight=t_weight,
        chunk_size=6,
    )
    parts.total.backward()
    assert max(seen_rows) <= 6
    assert sum(seen_rows) == int((labels != IGNORE_INDEX).sum())  # masked rows are skipped, each row once


def test_teacher_gets_no_gradient():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(seed=6)
    t_hidden.requires_grad_()
    t_weight.requires_grad_()
    teacher_logits = (t_hidden @ t_weight.T).detach().requires_grad_()
    for teacher in (
        {"teacher_logits": teacher_logits},
        {"teacher_hidden": t_hidden, "teacher_head_weight": t_weight},
    ):
        chunked_distillation_loss(
            hidden, weight, labels, get_divergence("forward_kl"), 1.0, **teacher
        ).total.backward()
    assert t_hidden.grad is None and t_weight.grad is None and teacher_logits.grad is None


def test_upstream_gradient_scales_the_gradients():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(seed=7)
    kwargs = {"teacher_hidden": t_hidden, "teacher_head_weight": t_weight, "chunk_size": 9}
    divergence = get_divergence("total_variation")
    once = _grads(
        chunked_distillation_loss(hidden, weight, labels, divergence, 0.5, **kwargs).total, [hidden, weight]
    )
    scaled = _grads(
        -2.5 * chunked_distillation_loss(hidden, weight, labels, divergence, 0.5, **kwargs).total,
        [hidden, weight],
    )
    for a, b in zip(once, scaled):
        # The upstream factor multiplies the finished gradient once: one rounding of the product (<= 2u relative,
        # inside assert_close's float32 rtol of 1.3e-6), no reduction in between.
        torch.testing.assert_close(b, -2.5 * a)


def test_micro_batches_normalised_by_the_step_tokens_sum_to_the_full_batch():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(shape=(4, 9), seed=8)
    labels[0, :7] = IGNORE_INDEX
    divergence = get_divergence("skew_reverse_kl")
    step_tokens = int((labels != IGNORE_INDEX).sum())

    def loss(rows):
        return chunked_distillation_loss(
            hidden[rows], weight, labels[rows], divergence, 0.9, step_tokens,
            teacher_hidden=t_hidden[rows], teacher_head_weight=t_weight, chunk_size=5,
        ).total  # fmt: skip

    full = loss(slice(0, 4))
    full_grads = _grads(full, [hidden, weight])
    split = loss(slice(0, 1)) + loss(slice(1, 4))
    # The same terms summed in two parts: as accurate as the full batch, both against the dense float64 objective.
    exact = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    teacher_logits = t_hidden.double() @ t_weight.double().T
    reference, _, _ = _dense(*exact, None, labels, divergence, 0.9, step_tokens, teacher_logits)
    assert_as_accurate_as(split.detach(), full.detach(), reference.detach())
    for got, base, want in zip(_grads(split, [hidden, weight]), full_grads, _grads(reference, exact)):
        assert_as_accurate_as(got, base, want)


def test_without_a_divergence_it_is_the_token_mean_cross_entropy_and_needs_no_teacher():
    hidden, weight, head_bias, *_, labels = _inputs(seed=9)
    parts = chunked_distillation_loss(hidden, weight, labels, None, 0.0, chunk_size=4, lm_head_bias=head_bias)
    cross_entropy = torch.nn.functional.cross_entropy
    expected = cross_entropy(hidden @ weight.T + head_bias, labels, ignore_index=IGNORE_INDEX)
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, head_bias)]
    reference = cross_entropy(exact[0] @ exact[1].T + exact[2], labels, ignore_index=IGNORE_INDEX)
    assert_as_accurate_as(parts.total.detach(), expected.detach(), reference.detach())
    got, base, want = (
        _grads(total, [w])[0]
        for total, w in ((parts.total, weight), (expected, weight), (reference, exact[1]))
    )
    assert_as_accurate_as(got, base, want)
    assert parts.divergence.item() == 0.0


def test_evaluation_under_no_grad_gives_the_same_value():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(seed=10)
    kwargs = {"teacher_hidden": t_hidden, "teacher_head_weight": t_weight, "chunk_size": 4}
    divergence = get_divergence("generalized_jsd")
    with torch.no_grad():
        evaluated = chunked_distillation_loss(hidden, weight, labels, divergence, 1.0, **kwargs)
    trained = chunked_distillation_loss(hidden, weight, labels, divergence, 1.0, **kwargs)
    assert not evaluated.total.requires_grad
    torch.testing.assert_close(evaluated.total, trained.total.detach())


def test_masked_vocabulary_entries_in_the_teacher_give_finite_gradients():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(seed=11)
    teacher_logits = t_hidden @ t_weight.T
    teacher_logits[:, [0, 5, 9]] = -math.inf  # e.g. padded vocabulary rows
    for name in DIVERGENCES:
        parts = chunked_distillation_loss(
            hidden, weight, labels, get_divergence(name), 1.0, teacher_logits=teacher_logits, chunk_size=5
        )
        grads = _grads(parts.total, [hidden, weight])
        assert torch.isfinite(parts.total) and all(torch.isfinite(g).all() for g in grads), name


def test_inconsistent_inputs_are_rejected():
    hidden, weight, _, t_hidden, t_weight, _, labels = _inputs(seed=12)
    divergence = get_divergence("forward_kl")
    teacher_logits = t_hidden @ t_weight.T
    with pytest.raises(ValueError, match="not both"):
        chunked_distillation_loss(
            hidden,
            weight,
            labels,
            divergence,
            1.0,
            teacher_logits=teacher_logits,
            teacher_hidden=t_hidden,
            teacher_head_weight=t_weight,
        )
    with pytest.raises(ValueError, match="teacher"):
        chunked_distillation_loss(hidden, weight, labels, divergence, 1.0)
    with pytest.raises(ValueError, match="go together"):
        chunked_distillation_loss(hidden, weight, labels, divergence, 1.0, teacher_hidden=t_hidden)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        chunked_distillation_loss(
            hidden, weight, labels, divergence, 1.0, teacher_logits=teacher_logits[:, :-1]
        )
    with pytest.raises(ValueError, match="labels"):
        chunked_distillation_loss(hidden, weight, labels[:-1], None, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(hidden, weight, labels, None, 0.0, chunk_size=0)
