"""AdamW with the usual no-decay groups, and the learning-rate schedules of the original code."""

from __future__ import annotations

import math

import torch
from torch import nn

from distillm.config import TrainConfig


def _no_decay(module: nn.Module, name: str) -> bool:
    """Biases and normalisation weights are not decayed (the original matched GPT-2 names; this is general)."""
    return (
        name.endswith("bias")
        or isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        or "norm" in type(module).__name__.lower()
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and embeddings, undecayed biases and norm weights."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights appear twice
                continue
            seen.add(id(param))
            (no_decay if _no_decay(module, name) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``; PyTorch's fused kernel where every parameter allows it.

    The fused kernel updates all tensors in one pass (the default on CPU is a Python loop of a dozen ops per
    tensor): faster on CPU (benchmarks/README.md, "Figures without a benchmark"), and the same update up to
    float rounding. It is what the Hugging Face Trainer uses by default too.
    """
    groups = parameter_groups(model, config.weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, fused=fused or None
    )


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps.

    - cosine: linear warmup, then cosine from lr to lr_min at ``total_steps`` (the original's
      CosineAnnealingLR(T_max=total, eta_min=lr_min), which has no warmup by default);
    - constant: linear warmup, then flat;
    - noam: linear warmup, then decay as 1/sqrt(step) (the original's "noam", power 0.5).
    """
    warmup = config.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if config.scheduler == "constant":
        return 1.0
    if config.scheduler == "noam":
        return math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1)) if step >= max(warmup, 1) else 1.0
    floor = config.lr_min / config.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
