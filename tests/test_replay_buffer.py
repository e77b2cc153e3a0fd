"""The replay buffer (`distillm.replay_buffer`): FIFO capacity, seeded sampling, checkpoint state, re-collation."""

from __future__ import annotations

import pytest
import torch

from distillm.data import collate
from distillm.replay_buffer import ReplayBuffer, collate_samples

PAD = 0


def make_batch(first_id: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """A contract batch whose row b has prompt [first_id + b] * (b + 1) and response [first_id + b, EOS]."""
    items = [([first_id + b] * (b + 1), [first_id + b, PAD]) for b in range(rows)]
    return collate(items, PAD)


def row_ids(buffer: ReplayBuffer) -> list[int]:
    """The identifying token (first prompt token) of every sample, oldest first."""
    return [int(sample["prompt_ids"][0]) for sample in buffer.state_dict()["samples"]]


def test_buffer_holds_at_most_capacity_samples_and_reports_full():
    buffer = ReplayBuffer(capacity=5)
    assert len(buffer) == 0 and not buffer.is_full()
    buffer.push_batch(make_batch(10))
    buffer.push_batch(make_batch(20))
    assert len(buffer) == 4 and not buffer.is_full()
    buffer.push_batch(make_batch(30))
    assert len(buffer) == 5 and buffer.is_full()
    buffer.push_batch(make_batch(40, rows=3))
    assert len(buffer) == 5


def test_the_oldest_samples_are_evicted_first():
    buffer = ReplayBuffer(capacity=5)
    for first in (10, 20, 30, 40):
        buffer.push_batch(make_batch(first))  # rows 10, 11, 20, 21, 30, 31, 40, 41
    assert row_ids(buffer) == [21, 30, 31, 40, 41]


def test_pushed_rows_are_stored_without_padding():
    buffer = ReplayBuffer()
    buffer.push_batch(make_batch(10, rows=3))
    sample = buffer.state_dict()["samples"][0]  # prompt [10], response [10, EOS]: reads [10, 10]
    assert sample["input_ids"].tolist() == [10, 10]
    assert sample["attention_mask"].tolist() == [1, 1]
    assert sample["labels"].tolist() == [10, PAD]  # shifted: the prompt token predicts 10, then EOS
    assert sample["prompt_ids"].tolist() == [10]
    assert sample["prompt_attention_mask"].tolist() == [1]


def test_sampling_is_deterministic_under_a_seeded_generator_and_without_replacement():
    buffer = ReplayBuffer(capacity=100)
    for first in range(0, 100, 10):
        buffer.push_batch(make_batch(first + 1, rows=5))  # 50 distinct ids

    def draw(seed: int) -> list[int]:
        return [int(s["prompt_ids"][0]) for s in buffer.sample(20, torch.Generator().manual_seed(seed))]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert len(set(draw(5))) == 20
    assert sorted(int(s["prompt_ids"][0]) for s in buffer.sample(50, torch.Generator())) == sorted(
        row_ids(buffer)
    )


def test_sampling_is_uniform_over_the_buffer():
    buffer = ReplayBuffer(capacity=4)
    buffer.push_batch(make_batch(10, rows=4))
    generator = torch.Generator().manual_seed(0)
    counts = {i: 0 for i in (10, 11, 12, 13)}
    for _ in range(8000):
        counts[int(buffer.sample(1, generator)[0]["prompt_ids"][0])] += 1
    assert all(abs(c / 8000 - 0.25) < 0.02 for c in counts.values())  # sd of each share ~0.005


def test_sampling_more_than_the_buffer_holds_is_an_error():
    buffer = ReplayBuffer()
    buffer.push_batch(make_batch(10))
    with pytest.raises(ValueError, match="cannot draw 3"):
        buffer.sample(3, torch.Generator())


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    buffer = ReplayBuffer(capacity=6)
    for first in (10, 20, 30, 40):
        buffer.push_batch(make_batch(first))
    torch.save({"buffer": buffer.state_dict()}, tmp_path / "state.pt")
    restored = ReplayBuffer(capacity=1)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["buffer"])
    assert restored.capacity == 6 and len(restored) == 6 and restored.is_full()
    assert row_ids(restored) == row_ids(buffer)
    original = buffer.sample(4, torch.Generator().manual_seed(1))
    again = restored.sample(4, torch.Generator().manual_seed(1))
    for a, b in zip(original, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    restored.push_batch(make_batch(50))  # eviction continues in the same order after the restore
    assert row_ids(restored) == [30, 31, 40, 41, 50, 51]


def test_recollated_samples_equal_the_original_batch():
    batch = make_batch(10, rows=4)
    buffer = ReplayBuffer()
    buffer.push_batch(batch)
    recollated = collate_samples(buffer.state_dict()["samples"], PAD)
    assert recollated.keys() == batch.keys()
    for key in batch:
        assert torch.equal(recollated[key], batch[key]), key


def test_a_recollated_subset_equals_collating_those_rows_directly():
    buffer = ReplayBuffer()
    buffer.push_batch(make_batch(10, rows=4))
    picked = buffer.sample(2, torch.Generator().manual_seed(0))
    ids = [int(s["prompt_ids"][0]) for s in picked]
    direct = collate([([i] * (i - 9), [i, PAD]) for i in ids], PAD)
    recollated = collate_samples(picked, PAD)
    for key in direct:
        assert torch.equal(recollated[key], direct[key]), key


def test_pushing_keys_outside_the_batch_contract_is_an_error():
    batch = make_batch(10)
    batch["position_ids"] = torch.zeros_like(batch["input_ids"])
    with pytest.raises(ValueError, match="position_ids"):
        ReplayBuffer().push_batch(batch)
