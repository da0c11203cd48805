"""The optimizer (AdamW over the trainable parameters) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from prefkit.recipe import TrainConfig


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter's device and dtype (the check
    torch itself makes at the first step with ``fused=True``)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def adamw(params: list[torch.Tensor], **settings) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for the parameters' device (CUDA, and CPU
    since torch 2.4): the same update to float rounding, in one kernel instead of many small ops
    per tensor; otherwise torch's default implementation."""
    return torch.optim.AdamW(params, fused=fused_supported(params) or None, **settings)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = adamw(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total=total_steps, warmup=cfg.warmup_steps, kind=cfg.scheduler),
    )
    return optimizer, scheduler
