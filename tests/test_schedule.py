"""The adaptive schedule (`distillm.schedule`) against hand-written traces."""

from __future__ import annotations

import pytest
import torch

from distillm.schedule import (
    AdaptiveState,
    choose_source,
    draw_coin,
    mixed_source,
    replay_fraction,
    update_on_eval,
)


def run_evals(losses: list[float], algorithm: str) -> list[tuple[float, float | None]]:
    """(phi, reference) after each evaluation, from phi = 0 and no reference; eps = 0.25, step = 0.1."""
    state, trace = AdaptiveState(phi=0.0), []
    for loss in losses:
        state = update_on_eval(state, loss, loss_eps=0.25, phi_step=0.1, algorithm=algorithm)
        trace.append((round(state.phi, 10), state.reference_loss))
    return trace


# Losses are multiples of 1/8 so that "reference + eps" is exact in binary floating point.
LOSSES = [2.0, 1.75, 2.125, 2.25, 2.5, 2.625, 2.75, 2.5, 3.0]


def test_code_schedule_follows_a_hand_trace():
    expected = [
        (0.0, 2.0),  # first evaluation: sets the reference
        (0.0, 2.0),  # fell: nothing
        (0.0, 2.0),  # rose by 0.125 < eps: nothing
        (0.1, 2.25),  # 2.25 >= 2.0 + 0.25 (equality counts): phi up, reference reset
        (0.2, 2.5),  # 2.5 >= 2.25 + 0.25
        (0.2, 2.5),  # 2.625 < 2.75
        (0.3, 2.75),  # 2.75 >= 2.75: a slow drift over two evaluations still counts
        (0.3, 2.75),
        (0.4, 3.0),
    ]
    assert run_evals(LOSSES, "code") == expected


def test_code_schedule_caps_phi_at_one():
    state = AdaptiveState(phi=0.95, reference_loss=1.0)
    state = update_on_eval(state, 2.0, loss_eps=0.1, phi_step=0.1)
    assert state == AdaptiveState(phi=1.0, reference_loss=2.0)
    state = update_on_eval(state, 3.0, loss_eps=0.1, phi_step=0.1)
    assert state == AdaptiveState(phi=1.0, reference_loss=3.0)


def test_paper_schedule_compares_with_the_previous_evaluation():
    expected = [
        (0.0, 2.0),
        (0.0, 1.75),  # the reference follows every evaluation
        (0.1, 2.125),  # 2.125 > 1.75 + 0.25
        (0.1, 2.25),  # 2.25 < 2.375, although the code schedule raises phi here
        (0.1, 2.5),  # 2.5 == 2.25 + 0.25 is not a strict rise
        (0.1, 2.625),  # a slow drift never counts
        (0.1, 2.75),
        (0.1, 2.5),
        (0.2, 3.0),  # 3.0 > 2.5 + 0.25
    ]
    assert run_evals(LOSSES, "paper") == expected


def test_paper_schedule_needs_a_strict_rise_and_code_schedule_does_not():
    state = AdaptiveState(phi=0.0, reference_loss=1.0)
    assert update_on_eval(state, 1.5, loss_eps=0.5, phi_step=0.1, algorithm="code").phi == 0.1
    assert update_on_eval(state, 1.5, loss_eps=0.5, phi_step=0.1, algorithm="paper").phi == 0.0


def test_replay_fraction_is_one_minus_t_over_t_half_or_t_over_t():
    assert [replay_fraction("decreasing", t, 4) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [replay_fraction("constant", t, 4) for t in range(5)] == [0.5] * 5
    assert [replay_fraction("increasing", t, 4) for t in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        replay_fraction("sometimes", 1, 4)


# (u, phi, r, buffer_full) -> source; phi * r is the fresh share lambda.
CODE_TRACE = [
    (0.10, 0.0, 1.0, False, "dataset"),  # phi = 0: always the dataset (training starts as plain KD)
    (0.10, 0.5, 0.4, True, "fresh"),  # u < lambda = 0.2
    (0.30, 0.5, 0.4, True, "replay"),  # lambda <= u < phi, buffer full
    (0.30, 0.5, 0.4, False, "fresh"),  # same, but the buffer is still filling: generate
    (0.50, 0.5, 0.4, False, "dataset"),  # u >= phi
    (0.70, 0.5, 0.4, True, "dataset"),
    (0.19, 0.5, 0.4, True, "fresh"),
    (0.20, 0.5, 0.4, True, "replay"),  # u == lambda is not below it
    (0.99, 1.0, 0.0, True, "replay"),  # phi = 1 at the end of a decreasing schedule: all replay
]


@pytest.mark.parametrize(("u", "phi", "r", "full", "expected"), CODE_TRACE)
def test_code_sources_follow_a_hand_trace(u, phi, r, full, expected):
    assert choose_source(u, phi, r, full, "code") == expected


PAPER_TRACE = [
    (0.10, 0.0, 1.0, False, False, "dataset"),
    (
        0.10,
        0.5,
        0.4,
        True,
        False,
        "fresh_then_replay",
    ),  # generate into the buffer, then train on a buffer draw
    (0.30, 0.5, 0.4, True, False, "replay"),
    (0.30, 0.5, 0.4, False, False, "replay"),  # no force-filling in the paper
    (0.30, 0.5, 0.4, False, True, "fresh_then_replay"),  # nothing to replay yet
    (0.50, 0.5, 0.4, False, True, "dataset"),
    (0.70, 0.5, 0.4, True, False, "dataset"),
]


@pytest.mark.parametrize(("u", "phi", "r", "full", "empty", "expected"), PAPER_TRACE)
def test_paper_sources_follow_a_hand_trace(u, phi, r, full, empty, expected):
    assert choose_source(u, phi, r, full, "paper", buffer_empty=empty) == expected


def test_mixed_source_uses_student_outputs_with_probability_student_ratio():
    assert [mixed_source(u, 0.5) for u in (0.0, 0.49, 0.5, 0.9)] == ["fresh", "fresh", "dataset", "dataset"]
    assert mixed_source(0.999, 1.0) == "fresh"  # ImitKD: every step
    assert mixed_source(0.0, 0.0) == "dataset"


def test_draw_coin_is_uniform_and_the_same_for_identically_seeded_generators():
    rank0, rank1 = torch.Generator().manual_seed(10), torch.Generator().manual_seed(10)
    coins0 = [draw_coin(rank0) for _ in range(4000)]
    coins1 = [draw_coin(rank1) for _ in range(4000)]
    assert coins0 == coins1
    assert all(0.0 <= u < 1.0 for u in coins0)
    assert abs(sum(coins0) / len(coins0) - 0.5) < 0.02  # mean of U(0, 1); sd of the mean ~0.0046
    assert abs(sum(u < 0.3 for u in coins0) / len(coins0) - 0.3) < 0.03


def test_long_run_frequencies_of_the_code_schedule_match_its_probabilities():
    generator = torch.Generator().manual_seed(0)
    phi, r, draws = 0.6, 0.25, 20_000
    sources = [choose_source(draw_coin(generator), phi, r, True) for _ in range(draws)]
    assert abs(sources.count("fresh") / draws - phi * r) < 0.015
    assert abs(sources.count("replay") / draws - phi * (1 - r)) < 0.015
    assert abs(sources.count("dataset") / draws - (1 - phi)) < 0.015
