"""Atomic checkpoints and the RNG state they carry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from distillm.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from distillm.models import build_small_model


@pytest.fixture
def model_and_tokenizer(tiny_tokenizer):
    return build_small_model("gpt2", len(tiny_tokenizer), layers=1, hidden=16, heads=2), tiny_tokenizer


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_state_round_trip_replays_the_same_draws():
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first


def test_trainer_state_round_trips_through_weights_only_loading(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    path = save_checkpoint(
        tmp_path, 3, model, tokenizer, {"payload": torch.arange(4), "note": [1, 2.5, None]}
    )
    saved = load_trainer_state(path)  # weights_only=True: no pickled code
    assert (
        saved["step"] == 3
        and torch.equal(saved["payload"], torch.arange(4))
        and saved["note"] == [1, 2.5, None]
    )


def test_only_the_newest_checkpoints_are_kept(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, tokenizer, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
    tmp_path, model_and_tokenizer, monkeypatch
):
    model, tokenizer = model_and_tokenizer
    good = save_checkpoint(tmp_path, 1, model, tokenizer, {"marker": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, tokenizer, {"marker": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good, "a half-written folder must never count as a checkpoint"
    assert load_trainer_state(good)["marker"] == 1


def test_replacing_an_exported_model_never_leaves_a_broken_folder(tmp_path, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    target = tmp_path / "best"
    save_model(target, model, tokenizer, extra={"step": 1})
    monkeypatch.setattr(
        tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        save_model(target, model, tokenizer, extra={"step": 2})
    assert (target / "distillm.json").read_text().count('"step": 1') == 1
    assert (target / "model.safetensors").is_file()


def test_weights_load_back_exactly_including_tied_ones(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    path = save_checkpoint(tmp_path, 1, model, tokenizer, {})
    fresh = build_small_model("gpt2", len(tokenizer), layers=1, hidden=16, heads=2, seed=99)
    load_model_weights(fresh, path)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_weights_of_another_architecture_are_refused(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    path = save_checkpoint(tmp_path, 1, model, tokenizer, {})
    bigger = build_small_model("gpt2", len(tokenizer), layers=2, hidden=16, heads=2)
    with pytest.raises(RuntimeError, match="lacks weights"):
        load_model_weights(bigger, path)


def test_resume_takes_the_newest_intact_checkpoint_and_moves_damaged_ones_aside(
    tmp_path, model_and_tokenizer, caplog
):
    from distillm.checkpoint import NoGoodCheckpointError, resumable_checkpoint

    model, tokenizer = model_and_tokenizer
    good, bad = (save_checkpoint(tmp_path, step, model, tokenizer, {}, keep=2) for step in (1, 2))
    state = bad / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-1])
    with caplog.at_level("WARNING"):
        assert resumable_checkpoint(tmp_path) == good
    assert f"{state}: " in caplog.text and "truncated" in caplog.text
    assert (
        list_checkpoints(tmp_path) == [good] and (tmp_path / "checkpoints" / ".damaged-step-0000002").is_dir()
    )
    (good / "model.safetensors").unlink()
    with pytest.raises(NoGoodCheckpointError, match="no intact checkpoint .* step-0000001"):
        resumable_checkpoint(tmp_path)
    assert resumable_checkpoint(tmp_path / "elsewhere") is None, "no checkpoints at all: a fresh start"


def test_a_pruned_checkpoint_never_stays_half_deleted_under_its_name(
    tmp_path, model_and_tokenizer, monkeypatch
):
    import shutil

    model, tokenizer = model_and_tokenizer
    save_checkpoint(tmp_path, 1, model, tokenizer, {}, keep=1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if "trash" in str(path) and (tmp_path / "checkpoints" / ".trash-step-0000001").exists():
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, tokenizer, {}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
