"""Where each micro-batch's training sequences come from.

The loop asks one question per micro-batch, ``next_batch(dataset_batch, step, student)``, and gets back the
batch to train on and its source name:

- ``dataset``: the dataset batch itself (SFT, KD, SeqKD; and whenever the coin says so);
- ``fresh``: responses sampled now, for the dataset batch's prompts, by the student (or the teacher);
- ``replay``: a uniform sample of earlier generated responses from the replay buffer.

``sources.kind`` picks the rule: ``dataset`` always; ``mixed`` flips a coin with ``student_ratio`` (ImitKD
with 1.0, GKD with 0.5); ``adaptive`` is DistiLLM's schedule (``distillm.schedule``), whose probability phi
rises whenever the dev loss does. The coin comes from a generator seeded with the run's seed and advanced
identically on every process, so all processes always agree (the original drew it per rank).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from distillm.config import Config
from distillm.generation import sample, samples_to_batch
from distillm.replay_buffer import ReplayBuffer, collate_samples
from distillm.schedule import (
    AdaptiveState,
    choose_source,
    draw_coin,
    mixed_source,
    replay_fraction,
    update_on_eval,
)

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]


class Sources:
    """Per micro-batch choice of training sequences; its state is part of every checkpoint."""

    def __init__(
        self,
        config: Config,
        tokenizer,
        teacher: nn.Module | None,
        total_steps: int,
        device: torch.device,
        rank: int = 0,
    ):
        self.config = config.sources
        self.generation = config.generation
        self.total_steps = total_steps
        self.device = device
        self.teacher = teacher
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        # Separate streams: the coin is shared by all processes (same seed everywhere, one draw per
        # micro-batch on each), while sampling and replay draw differently on each process.
        self.coin = torch.Generator().manual_seed(config.seed * 7919 + 1)
        self.sampling = torch.Generator(device="cpu").manual_seed(config.seed * 7919 + 2 + 104_729 * rank)
        self.buffer = ReplayBuffer(self.config.capacity)
        self.adaptive = AdaptiveState(phi=self.config.init_threshold, reference_loss=None)
        self.counts = {"dataset": 0, "fresh": 0, "replay": 0}

    # ---- the question the loop asks ----------------------------------------------------------------------

    def next_batch(self, dataset_batch: Batch, step: int, student: nn.Module) -> tuple[Batch, str]:
        source = self._choose(step)
        if source == "dataset":
            batch = dataset_batch
        elif source == "replay":
            batch = self._replay(len(dataset_batch["input_ids"]))
        else:
            batch = self._generate(dataset_batch, student)
            if self.config.kind == "adaptive" or self.config.mixed_from_buffer:
                self.buffer.push_batch(batch)
            if source == "fresh_then_replay" or (
                self.config.kind == "mixed" and self.config.mixed_from_buffer
            ):
                # The paper's Algorithm 1 (and the original's ImitKD/GKD): train on a buffer sample.
                batch = self._replay(len(dataset_batch["input_ids"]))
            source = "fresh"
        self.counts[source] += 1
        return batch, source

    def _choose(self, step: int) -> str:
        kind = self.config.kind
        if kind == "dataset":
            return "dataset"
        u = draw_coin(self.coin)  # drawn on every process from the same stream: all agree
        if kind == "mixed":
            return mixed_source(u, self.config.student_ratio)
        fraction = replay_fraction(self.config.replay_ratio, step, self.total_steps)
        return choose_source(
            u,
            self.adaptive.phi,
            fraction,
            self.buffer.is_full(),
            self.config.algorithm,
            buffer_empty=len(self.buffer) == 0,
        )

    def _generate(self, dataset_batch: Batch, student: nn.Module) -> Batch:
        model = self.teacher if self.config.generator == "teacher" else student
        prompt_ids = dataset_batch["prompt_ids"].to(self.device)
        prompt_mask = dataset_batch["prompt_attention_mask"].to(self.device)
        responses = sample(model, prompt_ids, prompt_mask, self.generation, self.eos, self.pad, self.sampling)
        return {
            k: v.cpu()
            for k, v in samples_to_batch(prompt_ids, prompt_mask, responses, self.eos, self.pad).items()
        }

    def _replay(self, batch_size: int) -> Batch:
        n = min(batch_size, len(self.buffer))
        return collate_samples(self.buffer.sample(n, self.sampling), self.pad)

    # ---- evaluation hook and state -------------------------------------------------------------------------

    def on_evaluation(self, dev_loss: float) -> None:
        if self.config.kind != "adaptive":
            return
        before = self.adaptive.phi
        self.adaptive = update_on_eval(
            self.adaptive, dev_loss, self.config.loss_eps, self.config.phi_step, self.config.algorithm
        )
        if self.adaptive.phi != before:
            logger.info("dev loss %.4f rose: phi %.2f -> %.2f", dev_loss, before, self.adaptive.phi)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {f"source_{k}": v for k, v in self.counts.items()}
        if self.config.kind == "adaptive":
            info.update(phi=self.adaptive.phi, buffer_size=len(self.buffer))
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "coin": self.coin.get_state(),
            "sampling": self.sampling.get_state(),
            "buffer": self.buffer.state_dict(),
            "phi": self.adaptive.phi,
            "reference_loss": self.adaptive.reference_loss,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coin.set_state(state["coin"])
        self.sampling.set_state(state["sampling"])
        self.buffer.load_state_dict(state["buffer"])
        self.adaptive = AdaptiveState(phi=state["phi"], reference_loss=state["reference_loss"])
        self.counts = dict(state["counts"])


def build_sources(config: Config, tokenizer, teacher, total_steps: int, device, rank: int = 0) -> Sources:
    return Sources(config, tokenizer, teacher, total_steps, device, rank)
