"""AdamW parameter groups (no weight decay on gains, biases, embeddings and the logit scale) and the learning-rate
schedule: linear warmup, then cosine decay to ``min_lr`` (or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipforge.train.config import OptimConfig

# Parameters that are embeddings or temperature rather than weights: never decayed (as in the paper's code).
_NO_DECAY_NAMES = ("logit_scale", "class_token", "pos_embed", "token_embed", "segment_embed")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices and conv kernels only (not gains, biases, embeddings, scale)."""
    if param.ndim < 2:
        return False
    return not any(part in name for part in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
    )


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier on ``config.lr`` for optimizer step ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
