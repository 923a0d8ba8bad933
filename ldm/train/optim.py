"""AdamW (fused where available) and the learning rate as a pure function of the optimizer step."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ldm.train.config import OptimConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over `params`; the fused kernel by default on CUDA (one launch for all tensors)."""
    params = [p for p in params if p.requires_grad]
    fused = config.fused if config.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay, fused=fused or None)


def lr_at(step: int, config: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant, cosine or linear decay.

    A pure function of the step, so a resumed run continues the exact schedule with no scheduler state.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    total = (config.decay_steps or max_steps) - config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total))
    if config.lr_schedule == "cosine":  # SGDR (Loshchilov & Hutter 2017) without restarts
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
