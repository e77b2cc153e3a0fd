"""The off-policy replay buffer of DistiLLM: a FIFO of individual training samples, kept on the CPU.

A sample is one row of a batch of the batch contract (``docs/design.md``) with its padding stripped: a dict
of 1-D tensors (``input_ids``, ``attention_mask``, ``labels``, ``prompt_ids``, ``prompt_attention_mask``).
:func:`collate_samples` pads sampled rows back into a batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from distillm import IGNORE_INDEX

# Batch-contract keys -> (which mask gives the row's real length, padding side, padding value or None = pad id).
_LAYOUT: dict[str, tuple[str, str, int | None]] = {
    "input_ids": ("attention_mask", "right", None),
    "attention_mask": ("attention_mask", "right", 0),
    "labels": ("attention_mask", "right", IGNORE_INDEX),
    "prompt_ids": ("prompt_attention_mask", "left", None),
    "prompt_attention_mask": ("prompt_attention_mask", "left", 0),
}

Sample = dict[str, Tensor]


class ReplayBuffer:
    """FIFO of at most ``capacity`` samples; once full, each new sample evicts the oldest."""

    def __init__(self, capacity: int = 1000):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._samples)

    def is_full(self) -> bool:
        return len(self._samples) == self.capacity

    def push_batch(self, batch: dict[str, Tensor]) -> None:
        """Add every row of a padded ``batch`` (``[B, T]`` / ``[B, P]`` tensors of the batch contract)."""
        unknown = sorted(set(batch) - set(_LAYOUT))
        if unknown:
            raise ValueError(
                f"the replay buffer stores batch-contract keys {sorted(_LAYOUT)}; got also {unknown}"
            )
        missing_masks = sorted({_LAYOUT[key][0] for key in batch} - set(batch))
        if missing_masks:
            raise ValueError(f"cannot strip the padding of the batch without {missing_masks}")
        lengths = {
            mask_key: batch[mask_key].sum(-1).tolist()
            for mask_key, _, _ in _LAYOUT.values()
            if mask_key in batch
        }
        for row in range(_batch_size(batch)):
            sample: Sample = {}
            for key, values in batch.items():
                mask_key, side, _ = _LAYOUT[key]
                length = lengths[mask_key][row]
                kept = values[row, :length] if side == "right" else values[row, values.shape[1] - length :]
                sample[key] = kept.detach().to("cpu", copy=True)  # a copy: keep no view of the batch alive
            self._samples.append(sample)

    def sample(self, n: int, generator: torch.Generator) -> list[Sample]:
        """``n`` distinct samples drawn uniformly (without replacement) with ``generator``."""
        if not 0 < n <= len(self._samples):
            raise ValueError(f"cannot draw {n} samples from a buffer holding {len(self._samples)}")
        indices = torch.randperm(len(self._samples), generator=generator)[:n].tolist()
        return [self._samples[i] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and tensors, loadable with ``torch.load(weights_only=True)``; oldest sample first."""
        return {"capacity": self.capacity, "samples": [dict(sample) for sample in self._samples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._samples = deque((dict(sample) for sample in state["samples"]), maxlen=self.capacity)


def collate_samples(samples: Sequence[Sample], pad_token_id: int) -> dict[str, Tensor]:
    """Pad samples back into a batch of the batch contract: ``[B, T]`` right-padded, prompts ``[B, P]`` left-padded."""
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    batch: dict[str, Tensor] = {}
    for key in samples[0]:
        _, side, value = _LAYOUT[key]
        rows = [sample[key] for sample in samples]
        width = max(len(row) for row in rows)
        padded = rows[0].new_full((len(rows), width), pad_token_id if value is None else value)  # [B, width]
        for b, row in enumerate(rows):
            if side == "right":
                padded[b, : len(row)] = row
            else:
                padded[b, width - len(row) :] = row
        batch[key] = padded
    return batch


def _batch_size(batch: dict[str, Tensor]) -> int:
    sizes = {values.shape[0] for values in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()
