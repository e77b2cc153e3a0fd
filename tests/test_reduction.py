"""Masked sums and means, normalisation by the step's token count, the per-token CE, and the dense objective."""

from __future__ import annotations

import math

import pytest
import torch

from distillm import IGNORE_INDEX
from distillm.losses import (
    LossParts,
    distillation_loss,
    get_divergence,
    masked_mean,
    masked_sum,
    reverse_kl,
    token_cross_entropy,
)


def test_masked_sum_adds_only_the_valid_positions():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_sum(values, mask).item() == 1.0 + 3.0 + 6.0


def test_nan_and_inf_at_masked_positions_do_not_leak_into_the_sum_or_the_gradient():
    values = torch.tensor([1.0, math.nan, math.inf, 2.0], requires_grad=True)
    mask = torch.tensor([True, False, False, True])
    total = masked_sum(values, mask)
    (grad,) = torch.autograd.grad(total, [values])
    assert total.item() == 3.0
    assert grad.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_masked_mean_defaults_to_the_valid_tokens_of_the_batch():
    values = torch.tensor([2.0, 4.0, 100.0, 6.0])
    mask = torch.tensor([True, True, False, True])
    assert masked_mean(values, mask).item() == pytest.approx(4.0)


@pytest.mark.parametrize("num_tokens", [10, torch.tensor(10)])
def test_masked_mean_divides_by_the_step_token_count_when_given(num_tokens):
    values = torch.tensor([2.0, 4.0, 100.0, 6.0])
    mask = torch.tensor([True, True, False, True])
    assert masked_mean(values, mask, num_tokens).item() == pytest.approx(12.0 / 10)


def test_all_masked_batch_gives_zero_with_a_finite_zero_gradient():
    values = torch.randn(3, 5, requires_grad=True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for num_tokens in (None, 0):
        loss = masked_mean(values, mask, num_tokens)
        (grad,) = torch.autograd.grad(loss, [values])
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_mask_must_be_boolean_and_match_the_values_shape():
    with pytest.raises(TypeError):
        masked_sum(torch.ones(3), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError):
        masked_sum(torch.ones(3), torch.ones(4, dtype=torch.bool))


def test_splitting_a_step_into_micro_batches_with_the_step_token_count_gives_the_same_loss_and_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (4, 6), generator=generator)
    labels[0, :5] = IGNORE_INDEX  # micro-batches with very different token counts
    labels[3, 2:] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    step_tokens = int(mask.sum())

    full_logits = logits.clone().requires_grad_()
    full = masked_mean(token_cross_entropy(full_logits, labels), mask)
    (full_grad,) = torch.autograd.grad(full, [full_logits])

    split_logits = logits.clone().requires_grad_()
    total = torch.zeros(())
    for rows in (slice(0, 1), slice(1, 4)):  # 1 x ... and 3 x ...: uneven on purpose
        micro = masked_mean(token_cross_entropy(split_logits[rows], labels[rows]), mask[rows], step_tokens)
        micro.backward()  # gradients accumulate across micro-batches, as in the training loop
        total = total + micro.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(split_logits.grad, full_grad)


def test_token_cross_entropy_is_minus_log_softmax_at_the_label_and_zero_where_ignored():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]]).bfloat16()
    labels = torch.tensor([[1, IGNORE_INDEX]])
    ce = token_cross_entropy(logits, labels)
    expected_first = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    assert ce.dtype == torch.float32 and ce.shape == (1, 2)
    assert ce[0, 0].item() == pytest.approx(expected_first, rel=1e-6)
    assert ce[0, 1].item() == 0.0


def test_distillation_loss_weighs_ce_and_divergence_by_kd_ratio_over_the_step_tokens():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 9, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 5, 9, generator=generator)
    labels = torch.randint(0, 9, (2, 5), generator=generator)
    labels[1, 3:] = IGNORE_INDEX
    mask = labels != IGNORE_INDEX
    divergence = get_divergence("skew_reverse_kl", skew_alpha=0.1)

    parts = distillation_loss(
        student, labels, divergence, kd_ratio=0.25, num_tokens=20, teacher_logits=teacher
    )

    log_q = student.detach().double().log_softmax(-1)
    ce_sum = -log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].sum()
    div_sum = divergence(student.detach(), teacher)[mask].sum()
    assert isinstance(parts, LossParts)
    torch.testing.assert_close(parts.ce.double(), ce_sum / 20)
    torch.testing.assert_close(parts.divergence, div_sum / 20)
    torch.testing.assert_close(parts.total, 0.75 * parts.ce + 0.25 * parts.divergence)
    assert parts.total.requires_grad and not parts.ce.requires_grad and not parts.divergence.requires_grad


def test_distillation_loss_without_a_divergence_is_the_token_mean_ce():
    logits = torch.randn(3, 7)
    labels = torch.tensor([2, IGNORE_INDEX, 5])
    parts = distillation_loss(logits, labels, None, kd_ratio=0.0)
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(parts.total, expected)
    assert parts.divergence.item() == 0.0


def test_inconsistent_objectives_are_rejected():
    logits, labels = torch.randn(2, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="needs a divergence"):
        distillation_loss(logits, labels, None, kd_ratio=0.5)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(logits, labels, reverse_kl, kd_ratio=0.5)
    with pytest.raises(ValueError, match="kd_ratio"):
        distillation_loss(logits, labels, reverse_kl, kd_ratio=1.5, teacher_logits=logits)
