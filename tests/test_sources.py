"""Where training sequences come from: dataset, fresh student samples, or the replay buffer."""

from __future__ import annotations

import pytest
import torch

from distillm import IGNORE_INDEX
from distillm.config import load_config
from distillm.data import collate
from distillm.sources import Sources


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))


def _sources(tokenizer, *overrides, teacher=None, total_steps=20):
    config = load_config(None, ["model.student=s", "generation.max_new_tokens=5", *overrides])
    return Sources(config, tokenizer, teacher, total_steps, torch.device("cpu"))


def _dataset_batch(tokenizer, size=2):
    prompt = tokenizer.encode("reverse the list: one two", add_special_tokens=False)
    response = tokenizer.encode(" two one", add_special_tokens=False) + [tokenizer.eos_token_id]
    return collate([(prompt, response)] * size, tokenizer.pad_token_id)


def test_dataset_kind_always_returns_the_dataset_batch(tiny_tokenizer, student):
    sources = _sources(tiny_tokenizer)
    batch = _dataset_batch(tiny_tokenizer)
    for step in range(5):
        got, source = sources.next_batch(batch, step, student)
        assert source == "dataset" and got is batch
    assert sources.counts == {"dataset": 5, "fresh": 0, "replay": 0}


def test_mixed_with_ratio_one_trains_on_fresh_samples_of_the_same_prompts(tiny_tokenizer, student):
    sources = _sources(tiny_tokenizer, "sources.kind=mixed", "sources.student_ratio=1.0")
    batch = _dataset_batch(tiny_tokenizer)
    student.train()
    got, source = sources.next_batch(batch, 0, student)
    assert source == "fresh" and student.training, "the student goes back to train mode after sampling"
    for row in range(2):
        prompt = batch["prompt_ids"][row][batch["prompt_attention_mask"][row].bool()]
        length = len(prompt)
        assert torch.equal(got["input_ids"][row, :length], prompt)
        supervised = (got["labels"][row] != IGNORE_INDEX).nonzero().squeeze(-1)
        assert supervised[0] == length - 1, "the first supervised position predicts the first sampled token"
    assert len(sources.buffer) == 0, "strictly on-policy: nothing is kept for replay"


def test_mixed_with_ratio_zero_never_samples(tiny_tokenizer, student):
    sources = _sources(tiny_tokenizer, "sources.kind=mixed", "sources.student_ratio=0.0")
    assert {sources.next_batch(_dataset_batch(tiny_tokenizer), s, student)[1] for s in range(6)} == {
        "dataset"
    }


def test_mixed_from_buffer_trains_on_a_buffer_sample(tiny_tokenizer, student):
    sources = _sources(
        tiny_tokenizer, "sources.kind=mixed", "sources.student_ratio=1.0", "sources.mixed_from_buffer=true"
    )
    sources.next_batch(_dataset_batch(tiny_tokenizer), 0, student)
    assert len(sources.buffer) == 2


def test_adaptive_starts_on_the_dataset_and_raises_phi_when_the_dev_loss_rises(tiny_tokenizer, student):
    sources = _sources(tiny_tokenizer, "sources.kind=adaptive", "sources.loss_eps=0.1")
    assert {sources.next_batch(_dataset_batch(tiny_tokenizer), s, student)[1] for s in range(5)} == {
        "dataset"
    }
    sources.on_evaluation(2.0)  # first evaluation: the reference
    sources.on_evaluation(2.05)  # below reference + eps
    assert sources.describe()["phi"] == 0.0
    sources.on_evaluation(2.1)  # reached reference + eps
    assert sources.describe()["phi"] == pytest.approx(0.1)


def test_adaptive_with_phi_one_fills_the_buffer_then_mixes_fresh_and_replayed(tiny_tokenizer, student):
    sources = _sources(
        tiny_tokenizer,
        "sources.kind=adaptive",
        "sources.init_threshold=1.0",
        "sources.capacity=4",
        "sources.replay_ratio=increasing",
    )
    chosen = [sources.next_batch(_dataset_batch(tiny_tokenizer), s, student)[1] for s in range(20)]
    assert chosen[:2] == ["fresh", "fresh"], "while the buffer is not full, every draw below phi generates"
    assert "dataset" not in chosen and "replay" in chosen
    assert len(sources.buffer) == 4


def test_state_round_trip_continues_with_the_same_choices(tiny_tokenizer, student):
    def make():
        return _sources(
            tiny_tokenizer,
            "sources.kind=adaptive",
            "sources.init_threshold=0.5",
            "sources.capacity=4",
        )

    original = make()
    for step in range(6):
        original.next_batch(_dataset_batch(tiny_tokenizer), step, student)
    restored = make()
    restored.load_state_dict(original.state_dict())
    for step in range(6, 14):
        a, source_a = original.next_batch(_dataset_batch(tiny_tokenizer), step, student)
        b, source_b = restored.next_batch(_dataset_batch(tiny_tokenizer), step, student)
        assert source_a == source_b
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_can_be_the_generator(tiny_tokenizer, student):
    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0
            self.config = inner.config

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    teacher = Counting(student)
    sources = _sources(
        tiny_tokenizer,
        "sources.kind=mixed",
        "sources.student_ratio=1.0",
        "sources.generator=teacher",
        "model.teacher=t",
        teacher=teacher,
    )
    sources.next_batch(_dataset_batch(tiny_tokenizer), 0, student)
    assert teacher.calls > 0


def test_the_papers_algorithm_trains_on_buffer_samples_and_never_replays_from_an_empty_buffer(
    tiny_tokenizer, student
):
    sources = _sources(
        tiny_tokenizer,
        "sources.kind=adaptive",
        "sources.init_threshold=1.0",
        "sources.capacity=8",
        "sources.algorithm=paper",
        "sources.replay_ratio=constant",
    )
    chosen = [sources.next_batch(_dataset_batch(tiny_tokenizer), s, student)[1] for s in range(10)]
    assert chosen[0] == "fresh", "the first draw below phi finds an empty buffer: it generates first"
    assert set(chosen) <= {"fresh", "replay"} and len(sources.buffer) > 0
