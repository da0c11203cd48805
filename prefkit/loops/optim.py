"""The optimizer (AdamW over the trainable parameters) and the learning-rate schedule.

The schedule is a function of the optimizer step and the run's total steps. When a finished or
interrupted run is resumed with more steps (a larger ``train.max_steps`` or ``train.epochs``), the
schedule is re-planned for the new total, as if the run had been started with it: from the
resumed step on, every learning rate equals the one an uninterrupted run of the new length
uses. With ``scheduler: constant`` nothing changes; with a decaying schedule the rate rises to
where the longer plan has it (the resume says so).
"""

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


def replan_schedule(scheduler: LambdaLR, *, saved_total: int | None, total_steps: int) -> str | None:
    """After a checkpoint's scheduler state is loaded: set every group's learning rate from the
    schedule of ``total_steps`` at the resumed step. Returns a note when the plan changed."""
    before = list(scheduler.get_last_lr())
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    if saved_total is None or saved_total == total_steps:
        return None
    return (f"the run now has {total_steps} steps instead of {saved_total}: the learning-rate schedule is "
            f"re-planned for {total_steps} steps, as if the run had started with them "
            f"(lr at step {scheduler.last_epoch + 1}: {lrs[0]:.3g}; the old plan had {before[0]:.3g})")
