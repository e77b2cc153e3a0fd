"""DistiLLM's adaptive off-policy schedule, as pure functions (Ko et al., 2024, Algorithm 1; section 3.2).

phi is the probability of training on student-generated outputs (SGO). It starts at ``init_threshold`` and
grows by ``phi_step`` whenever the dev loss rises by ``loss_eps`` over a reference: once the student starts
to overfit the fixed dataset, it trains more on its own outputs. Each step one coin ``u ~ U(0, 1)`` decides
the source of the step's batch. The original code and the paper's Algorithm 1 differ in three details; both
are here (``algorithm="code"`` is the default) and ``docs/generation.md`` explains them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

Algorithm = Literal["code", "paper"]
ReplayRatio = Literal["decreasing", "constant", "increasing"]
Source = Literal["fresh", "replay", "dataset", "fresh_then_replay"]
"""Where a step's batch comes from.

- ``fresh``: sample responses from the student for the step's prompts, push them into the buffer, train on them.
- ``replay``: train on a uniform sample of the replay buffer.
- ``dataset``: train on the step's dataset batch.
- ``fresh_then_replay`` (paper's Algorithm 1 only): sample and push as for ``fresh``, then train on a
  uniform sample of the buffer (which may or may not contain the fresh samples).
"""


@dataclass(frozen=True)
class AdaptiveState:
    """What the schedule carries between evaluations (and in the checkpoint).

    ``phi``: the current SGO probability. ``reference_loss``: the dev loss that the next one is compared with;
    ``None`` until the first evaluation.
    """

    phi: float
    reference_loss: float | None = None


def update_on_eval(
    state: AdaptiveState,
    dev_loss: float,
    loss_eps: float,
    phi_step: float,
    algorithm: Algorithm = "code",
) -> AdaptiveState:
    """The state after an evaluation that measured ``dev_loss`` (the student's CE on ground-truth dev answers).

    The first evaluation (``reference_loss is None``; the loop runs one before training) only sets the
    reference. Afterwards:

    - ``code``: if ``dev_loss >= reference + loss_eps``, phi grows by ``phi_step`` (capped at 1) and the
      reference becomes ``dev_loss``; otherwise nothing changes, so the reference stays the loss at the last
      increase (or the first evaluation) and a slow drift upwards still triggers an increase eventually.
    - ``paper``: if ``dev_loss > reference + loss_eps`` phi grows likewise; the reference becomes
      ``dev_loss`` after every evaluation (the previous validation loss, L_{t-1} in Algorithm 1).
    """
    if algorithm not in ("code", "paper"):
        raise ValueError(f"unknown algorithm {algorithm!r}; expected 'code' or 'paper'")
    if state.reference_loss is None:
        return replace(state, reference_loss=dev_loss)
    threshold = state.reference_loss + loss_eps
    rose = dev_loss >= threshold if algorithm == "code" else dev_loss > threshold
    phi = min(state.phi + phi_step, 1.0) if rose else state.phi
    reference = dev_loss if (rose or algorithm == "paper") else state.reference_loss
    return AdaptiveState(phi=phi, reference_loss=reference)


def replay_fraction(kind: ReplayRatio, step: int, total_steps: int) -> float:
    """r(t), the share of phi spent on fresh generation at step ``t`` of ``T``: 1 - t/T, 1/2 or t/T."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    if kind == "decreasing":
        return 1.0 - progress
    if kind == "constant":
        return 0.5
    if kind == "increasing":
        return progress
    raise ValueError(f"unknown replay ratio {kind!r}; expected 'decreasing', 'constant' or 'increasing'")


def choose_source(
    u: float,
    phi: float,
    replay_fraction: float,
    buffer_full: bool,
    algorithm: Algorithm = "code",
    buffer_empty: bool = False,
) -> Source:
    """The adaptive schedule's source for a step whose coin is ``u`` (see :data:`Source`).

    With lambda = ``phi * replay_fraction``:

    - ``code``: ``fresh`` if ``u < lambda``, or if ``u < phi`` while the buffer is not yet full (the code
      force-fills the buffer); else ``replay`` if ``u < phi``; else ``dataset``. Once the buffer is full,
      P(SGO) = phi, of which lambda is fresh.
    - ``paper``: ``fresh_then_replay`` if ``u < lambda``; else ``replay`` if ``u < phi``; else ``dataset``.
      Algorithm 1 leaves replaying from an empty buffer undefined: with ``buffer_empty`` the replay case
      generates first (``fresh_then_replay``).
    """
    lam = phi * replay_fraction
    if algorithm == "code":
        if u < lam or (u < phi and not buffer_full):
            return "fresh"
        return "replay" if u < phi else "dataset"
    if algorithm == "paper":
        if u < lam or (u < phi and buffer_empty):
            return "fresh_then_replay"
        return "replay" if u < phi else "dataset"
    raise ValueError(f"unknown algorithm {algorithm!r}; expected 'code' or 'paper'")


def mixed_source(u: float, student_ratio: float) -> Literal["fresh", "dataset"]:
    """ImitKD / GKD: fresh student outputs with probability ``student_ratio``, else the dataset batch."""
    return "fresh" if u < student_ratio else "dataset"


def draw_coin(generator: torch.Generator) -> float:
    """One ``u ~ U(0, 1)`` from ``generator``.

    The training loop keeps a CPU generator dedicated to this coin, seeded with the run seed on every
    process, so all ranks draw the same ``u`` and pick the same source (the original drew with numpy per
    rank, so ranks could disagree). Its state goes into the checkpoint.
    """
    return torch.rand((), generator=generator, dtype=torch.float64).item()
