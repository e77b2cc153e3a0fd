"""MiniLLM's policy-gradient terms (`distillm.losses.minillm`) against the hand-worked example and the formulas.

The section-14 numbers come from shared/reference/minillm-method.md (the original functions run in float64 and
checked by a separate pure-Python recomputation); they are printed to 6 decimals, so they hold to half a unit
in the 6th decimal. The other references are the formulas written out plainly in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from distillm import IGNORE_INDEX
from distillm.losses.minillm import (
    clipped_policy_loss,
    mixed_sampling_weights,
    normalized_reward_to_go,
    pretraining_loss,
    sampled_reverse_kl,
    single_step_reverse_kl,
    token_rewards,
    whiten,
)

# Section 14 prints 6 decimals: half a unit in the last place, plus float64 rounding.
PRINTED = dict(rtol=0.0, atol=5e-7 + 1e-12)
ALPHA, SCALING, CLIP_REWARD, GAMMA, EPS = 0.2, 0.5, 100.0, 0.95, 0.2


def example() -> dict[str, torch.Tensor]:
    """Section 14's rollout: one row, R = 4, three real tokens (the last one EOS) and one padding step."""
    t = lambda *values: torch.tensor([values], dtype=torch.float64)  # noqa: E731  [1, 4]
    return {
        "mask": torch.tensor([[True, True, True, False]]),
        "logq_old": t(-1.2, -0.5, -2.0, 0.0),
        "logp": t(-0.9, -0.7, -1.0, 0.0),
        "logq": t(-1.0, -0.8, -1.5, 0.0),
    }


def expected(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def test_section_14_importance_weights():
    ex = example()
    w = mixed_sampling_weights(ex["logq_old"], ex["logp"], ex["mask"], ALPHA)
    torch.testing.assert_close(w, expected(0.934604, 1.037618, 0.744238, 1.0), **PRINTED)


def test_section_14_rewards():
    ex = example()
    r = token_rewards(ex["logp"], ex["logq_old"], ex["mask"], SCALING, CLIP_REWARD)
    torch.testing.assert_close(r, expected(0.6, -0.4, 2.0, 0.0), **PRINTED)


def test_section_14_reward_to_go_divided_by_the_remaining_length():
    ex = example()
    r = token_rewards(ex["logp"], ex["logq_old"], ex["mask"], SCALING, CLIP_REWARD)
    torch.testing.assert_close(
        normalized_reward_to_go(r, ex["mask"], GAMMA), expected(0.675, 0.75, 2.0, 0.0), **PRINTED
    )


def test_section_14_whitening_over_the_real_tokens_and_the_originals_over_all_positions():
    ex = example()
    advantages = expected(0.675, 0.75, 2.0, 0.0)
    ours = whiten(advantages, ex["mask"])
    torch.testing.assert_close(ours, expected(-0.767916, -0.644501, 1.412417, 0.0), **PRINTED)
    # The original's quirk (padding included) is the same function over a mask that keeps the padding.
    original = whiten(advantages, torch.ones_like(ex["mask"]))
    torch.testing.assert_close(original, expected(-0.251019, -0.147149, 1.584015, -1.185847), **PRINTED)


def test_section_14_clipped_loss_and_its_gradient():
    ex = example()
    w = mixed_sampling_weights(ex["logq_old"], ex["logp"], ex["mask"], ALPHA)
    # The example's advantages are the original's (whitened over the padding too).
    advantages = expected(-0.251019, -0.147149, 1.584015, -1.185847)
    logq = ex["logq"].clone().requires_grad_()
    loss = clipped_policy_loss(logq, ex["logq_old"], w, advantages, ex["mask"], EPS)
    torch.testing.assert_close(loss, torch.tensor(-0.498851, dtype=torch.float64), **PRINTED)
    loss.backward()
    # t1 and t2 are on the clipped branch (zero gradient); t0 gets -A_0 rho_0 / 3; the padding nothing.
    torch.testing.assert_close(logq.grad, expected(0.095515, 0.0, 0.0, 0.0), **PRINTED)


def test_section_14_logged_k3_reverse_kl_estimates():
    ex = example()
    k3 = sampled_reverse_kl(ex["logq_old"], ex["logp"], ex["mask"])
    torch.testing.assert_close(k3, expected(0.049859, 0.018731, 0.718282, 0.0), **PRINTED)


def test_the_k3_estimate_averages_to_the_exact_reverse_kl_over_the_students_distribution():
    g = torch.Generator().manual_seed(3)
    log_q = torch.randn(10, generator=g, dtype=torch.float64).log_softmax(-1)
    log_p = torch.randn(10, generator=g, dtype=torch.float64).log_softmax(-1)
    every_token = torch.ones(1, 10, dtype=torch.bool)
    k3 = sampled_reverse_kl(log_q[None], log_p[None], every_token)[0]
    # Its expectation under q, taken exactly over the vocabulary: E_q[p/q - 1] = 0 leaves E_q[log q - log p].
    torch.testing.assert_close((log_q.exp() * k3).sum(), (log_q.exp() * (log_q - log_p)).sum())
    assert torch.all(k3 >= 0)


def test_section_14_single_step_reverse_kl():
    student = torch.tensor([[[2.0, 1.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[1.0, 2.0, 0.0]]], dtype=torch.float64)
    value = single_step_reverse_kl(student, teacher, torch.tensor([[True]]))
    torch.testing.assert_close(value, torch.tensor(0.420512, dtype=torch.float64), **PRINTED)


def test_section_14_pretraining_term():
    student = torch.tensor([[[2.0, 1.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[1.0, 2.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[0]])
    value = pretraining_loss(student, teacher, labels, kd_ratio=0.5)
    torch.testing.assert_close(value, torch.tensor(0.830257, dtype=torch.float64), **PRINTED)
    # Its two halves: CE and the teacher's soft cross-entropy.
    ce = pretraining_loss(student, teacher, labels, kd_ratio=0.0)
    soft_ce = pretraining_loss(student, teacher, labels, kd_ratio=1.0)
    torch.testing.assert_close(ce, torch.tensor(0.407606, dtype=torch.float64), **PRINTED)
    torch.testing.assert_close(soft_ce, torch.tensor(1.252908, dtype=torch.float64), **PRINTED)


# ------------------------------------------------------------------------------------------------------------
# Properties and plain float64 references on random rollouts.


def random_rollout(rows: int = 3, steps: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random log-probabilities and advantages; the rows keep 7, 4 and 1 tokens (then padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 1][:rows])
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    logprobs = lambda: -torch.rand(rows, steps, generator=g, dtype=torch.float64) * 4  # noqa: E731
    return {
        "mask": mask,
        "logq_old": logprobs(),
        "logp": logprobs(),
        "advantages": torch.randn(rows, steps, generator=g, dtype=torch.float64),
        "noise": torch.randn(rows, steps, generator=g, dtype=torch.float64) * 0.3,
    }


def reference_policy_loss(logq, logq_old, w, advantages, mask, eps):
    """The clipped surrogate straight from its formula, in float64, differentiated by autograd."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            rho = torch.exp(logq[b, t] - logq_old[b, t]) * w[b, t]
            a = advantages[b, t]
            total = total + torch.maximum(-a * rho, -a * torch.clamp(rho, 1 - eps, 1 + eps))
            count += 1
    return total / max(count, 1)


def test_clipped_loss_and_gradient_equal_autograd_of_the_formula():
    ro = random_rollout()
    w = mixed_sampling_weights(ro["logq_old"], ro["logp"], ro["mask"], ALPHA)
    logq = (ro["logq_old"] + ro["noise"]).requires_grad_()
    reference_input = logq.detach().clone().requires_grad_()
    loss = clipped_policy_loss(logq, ro["logq_old"], w, ro["advantages"], ro["mask"], EPS)
    reference = reference_policy_loss(reference_input, ro["logq_old"], w, ro["advantages"], ro["mask"], EPS)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(logq.grad, reference_input.grad)
    # The example is not degenerate: some tokens on the clipped branch (zero gradient), some not.
    real_grads = logq.grad[ro["mask"]]
    assert (real_grads == 0).any() and (real_grads != 0).any()


def test_without_teacher_mixing_the_weights_are_one_and_the_first_pass_ratio_is_one():
    ro = random_rollout()
    w = mixed_sampling_weights(ro["logq_old"], ro["logp"], ro["mask"], alpha=0.0)
    assert torch.equal(w, torch.ones_like(w))
    logq = ro["logq_old"].clone().requires_grad_()
    loss = clipped_policy_loss(logq, ro["logq_old"], w, ro["advantages"], ro["mask"], EPS)
    loss.backward()
    count = int(ro["mask"].sum())
    # rho = 1 is inside the clip range: loss = mean(-A), gradient -A / count on the real tokens.
    expected_loss = -ro["advantages"][ro["mask"]].sum() / count
    torch.testing.assert_close(loss, expected_loss)
    expected_grad = torch.where(ro["mask"], -ro["advantages"] / count, 0.0)
    torch.testing.assert_close(logq.grad, expected_grad)


def test_full_teacher_mixing_weights_are_q_over_p():
    ro = random_rollout()
    w = mixed_sampling_weights(ro["logq_old"], ro["logp"], ro["mask"], alpha=1.0)
    torch.testing.assert_close(w, torch.where(ro["mask"], (ro["logq_old"] - ro["logp"]).exp(), 1.0))


def test_weights_of_tiny_probabilities_stay_finite_in_log_space():
    mask = torch.tensor([[True]])
    w = mixed_sampling_weights(torch.tensor([[-200.0]]), torch.tensor([[-210.0]]), mask, ALPHA)
    # q and p underflow float32 (e^-200); in log space w = 1 / (0.8 + 0.2 e^-10).
    torch.testing.assert_close(w, torch.tensor([[1 / (0.8 + 0.2 * math.exp(-10))]]))


def test_rewards_are_clipped_at_the_clip_range():
    mask = torch.tensor([[True, True, True]])
    logp = torch.tensor([[0.0, -30.0, -0.1]], dtype=torch.float64)
    logq_old = torch.tensor([[-30.0, 0.0, -0.2]], dtype=torch.float64)
    r = token_rewards(logp, logq_old, mask, reward_scaling=0.5, cliprange_reward=1.0)
    torch.testing.assert_close(r, torch.tensor([[1.0, -1.0, 0.2]], dtype=torch.float64))


def test_reward_to_go_equals_the_backward_recursion_over_each_rows_tokens():
    ro = random_rollout()
    rewards = ro["advantages"]
    ours = normalized_reward_to_go(rewards, ro["mask"], GAMMA)
    reference = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(ro["mask"][b].sum())
        future = 0.0
        for t in reversed(range(length)):
            future = float(rewards[b, t]) + GAMMA * future
            reference[b, t] = future / (length - t)
    torch.testing.assert_close(ours, reference)


def test_whitened_advantages_have_mean_zero_and_unit_variance_over_the_real_tokens():
    ro = random_rollout()
    values = ro["advantages"] * 5 + 3
    white = whiten(values, ro["mask"])
    real = white[ro["mask"]]
    count = real.numel()
    torch.testing.assert_close(real.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    variance = real.square().sum() / count
    raw_variance = values[ro["mask"]].var(unbiased=False)
    # var / (var + 1e-8) instead of exactly 1.
    torch.testing.assert_close(variance, raw_variance / (raw_variance + 1e-8))
    assert torch.equal(white[~ro["mask"]], torch.zeros_like(white[~ro["mask"]]))


def test_whitening_summed_over_identical_processes_equals_one_process():
    ro = random_rollout()
    alone = whiten(ro["advantages"], ro["mask"])
    two_identical_processes = whiten(ro["advantages"], ro["mask"], sum_over_processes=lambda x: 2 * x)
    torch.testing.assert_close(two_identical_processes, alone)


def every_term(ro: dict[str, torch.Tensor], logq: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = ro["mask"]
    w = mixed_sampling_weights(ro["logq_old"], ro["logp"], mask, ALPHA)
    rewards = token_rewards(ro["logp"], ro["logq_old"], mask, SCALING, CLIP_REWARD)
    advantages = whiten(normalized_reward_to_go(rewards, mask, GAMMA), mask)
    loss = clipped_policy_loss(logq, ro["logq_old"], w, advantages, mask, EPS)
    return {"w": w, "rewards": rewards, "advantages": advantages, "loss": loss}


def test_padding_values_change_nothing_and_an_all_padding_row_adds_nothing_with_finite_grads():
    ro = random_rollout()
    logq = (ro["logq_old"] + ro["noise"]).requires_grad_()
    clean = every_term(ro, logq)
    clean["loss"].backward()
    clean_grad = logq.grad.clone()

    # Garbage (inf, nan, huge) in every padding position, two extra padding steps, one all-padding row.
    rows, steps = ro["mask"].shape
    wide = lambda x, fill: torch.cat(  # noqa: E731
        [
            torch.cat([x, torch.full((rows, 2), fill, dtype=x.dtype)], 1),
            torch.full((1, steps + 2), fill, dtype=x.dtype),
        ]
    )
    padded = {
        "mask": wide(ro["mask"], False),
        "logq_old": wide(ro["logq_old"], float("nan")),
        "logp": wide(ro["logp"], float("-inf")),
        "advantages": wide(ro["advantages"], 1e30),
    }
    padded["logq_old"][~padded["mask"]] = float("nan")
    padded["logp"][~padded["mask"]] = float("-inf")
    logq_padded = wide(logq.detach(), float("inf"))
    logq_padded[~padded["mask"]] = float("inf")
    logq_padded.requires_grad_()
    dirty = every_term(padded, logq_padded)
    dirty["loss"].backward()

    real = padded["mask"]
    for name in ("w", "rewards", "advantages"):
        torch.testing.assert_close(dirty[name][real], clean[name][ro["mask"]], msg=name)
    torch.testing.assert_close(dirty["loss"], clean["loss"])
    torch.testing.assert_close(logq_padded.grad[real], clean_grad[ro["mask"]])
    assert torch.equal(logq_padded.grad[~real], torch.zeros_like(logq_padded.grad[~real]))


def test_an_all_padding_batch_gives_zero_loss_with_zero_finite_gradients():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    logq = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    advantages = whiten(normalized_reward_to_go(zeros, mask, GAMMA), mask)
    loss = clipped_policy_loss(logq, zeros, torch.ones_like(zeros), advantages, mask, EPS)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logq.grad, zeros)


def test_single_step_term_is_the_token_mean_of_the_exact_reverse_kl_and_zero_for_equal_models():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    value = single_step_reverse_kl(student, teacher, mask)
    q, p = student.softmax(-1), teacher.softmax(-1)
    per_token = (q * (q.log() - p.log())).sum(-1)
    reference = per_token[mask].mean()
    torch.testing.assert_close(value, reference)
    (grad,) = torch.autograd.grad(value, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad, reference_grad)
    same = single_step_reverse_kl(teacher, teacher, mask)
    torch.testing.assert_close(same, torch.tensor(0.0, dtype=torch.float64), atol=1e-15, rtol=0)


def test_pretraining_term_is_half_ce_half_soft_ce_over_the_supervised_tokens():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    value = pretraining_loss(student, teacher, labels, kd_ratio=0.5)
    keep = labels != IGNORE_INDEX
    log_q = student.log_softmax(-1)
    ce = -log_q.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    soft_ce = -(teacher.softmax(-1) * log_q).sum(-1)
    reference = (0.5 * ce + 0.5 * soft_ce)[keep].mean()
    torch.testing.assert_close(value, reference)
    (grad,) = torch.autograd.grad(value, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad, reference_grad)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: mixed_sampling_weights(
                torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), 1.5
            ),
            "teacher_mix_alpha",
        ),
        (
            lambda: token_rewards(
                torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), 0.0
            ),
            "reward_scaling",
        ),
        (
            lambda: normalized_reward_to_go(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), 1.5),
            "gamma",
        ),
        (lambda: whiten(torch.zeros(1, 1), torch.ones(1, 1)), "bool"),
        (lambda: whiten(torch.zeros(1, 2), torch.ones(1, 1, dtype=torch.bool)), "shape"),
    ],
)
def test_bad_arguments_are_refused_naming_the_knob(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
