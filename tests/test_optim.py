"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distillm.config import TrainConfig
from distillm.models import build_small_model
from distillm.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from numerics import assert_as_accurate_as


def test_biases_and_norm_weights_are_not_decayed_and_tied_weights_appear_once():
    model = build_small_model("gpt2", vocab_size=64, layers=1, hidden=16, heads=2)
    decay, no_decay = parameter_groups(model, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("transformer.ln_f") for n in kept)
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert "transformer.h.0.ln_1.weight" in kept and "transformer.h.0.attn.c_attn.bias" in kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # lm_head is tied to wte: counted once
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_llama_rms_norms_are_recognised():
    model = build_small_model("llama", vocab_size=64, layers=1, hidden=16, heads=2)
    _, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "model.norm.weight" in kept and "model.layers.0.input_layernorm.weight" in kept


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].requires_grad_(False)
    groups = parameter_groups(model, 0.01)
    assert sum(len(g["params"]) for g in groups) == 2


@pytest.mark.parametrize("step", [0, 10, 50, 99, 100])
def test_cosine_goes_from_lr_to_lr_min(step):
    config = TrainConfig(lr=1e-3, lr_min=1e-5, scheduler="cosine")
    expected = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * step / 100))  # the textbook formula
    assert lr_factor(step, 100, config) * 1e-3 == pytest.approx(expected)


def test_warmup_is_linear_then_the_schedule_starts_from_the_peak():
    config = TrainConfig(lr=1e-3, lr_min=0.0, scheduler="cosine", warmup_steps=10)
    assert [lr_factor(s, 110, config) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(10, 110, config) == pytest.approx(1.0)
    assert lr_factor(110, 110, config) == pytest.approx(0.0)


def test_constant_and_noam():
    constant = TrainConfig(scheduler="constant", warmup_steps=4)
    assert lr_factor(1, 100, constant) == pytest.approx(0.5) and lr_factor(50, 100, constant) == 1.0
    noam = TrainConfig(scheduler="noam", warmup_steps=4)
    assert lr_factor(16, 100, noam) == pytest.approx(math.sqrt(4) / math.sqrt(16))


def test_scheduler_drives_the_optimizer_learning_rate():
    model = nn.Linear(2, 2)
    config = TrainConfig(lr=0.1, lr_min=0.0, scheduler="cosine")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 4, config)
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.1 * lr_factor(s, 4, config) for s in range(1, 5)])
    assert rates[-1] == pytest.approx(0.0)


def test_the_optimizer_is_fused_on_cpu_and_steps_like_the_plain_loop_implementation():
    # Three copies of the same weights: ours (fused), the plain per-parameter loop, and the plain loop in float64.
    # All three get the same gradients, so the optimizers' arithmetic is the only difference (gradients taken
    # from the models themselves would amplify it: Adam's m / sqrt(v) turns a one-ulp change of a near-zero
    # gradient into a change of up to lr).
    model = build_small_model("gpt2", vocab_size=64, layers=1, hidden=16, heads=2)
    reference = build_small_model("gpt2", vocab_size=64, layers=1, hidden=16, heads=2)
    exact = build_small_model("gpt2", vocab_size=64, layers=1, hidden=16, heads=2).double()
    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, config)

    def plain_adamw(m):
        return torch.optim.AdamW(
            parameter_groups(m, config.weight_decay),
            lr=config.lr,
            betas=config.adam_betas,
            eps=config.adam_eps,
            foreach=False,
        )

    plain, plain64 = plain_adamw(reference), plain_adamw(exact)
    assert fused.defaults["fused"] is True
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        for m, optimizer in ((model, fused), (reference, plain), (exact, plain64)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.to(p.dtype)
            optimizer.step()
            optimizer.zero_grad()
    for (name, p), q, r in zip(model.named_parameters(), reference.parameters(), exact.parameters()):
        assert_as_accurate_as(p.detach(), q.detach(), r.detach(), msg=name)
