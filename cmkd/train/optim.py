"""Optimizer and learning-rate schedule: linear warm-up, then step or cosine decay."""

from __future__ import annotations

import math
from typing import Iterable

import gin
import torch


@gin.configurable("optimizer")
def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    device: torch.device,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 5e-7,
    betas: tuple[float, float] = (0.95, 0.999),
) -> torch.optim.Optimizer:
    """Adam/AdamW as in the PSLA/AST recipes (betas 0.95/0.999, wd 5e-7); fused on CUDA."""
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if device.type == "cuda":
        kwargs["fused"] = True
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise ValueError(f"optimizer.name = {name!r} is not one of 'adamw', 'adam', 'sgd'")


@gin.configurable("schedule")
def schedule_settings(
    kind: str = "cosine",
    warmup_steps: int = 0,
    decay_start_epoch: int = 10,
    decay_every: int = 5,
    decay_factor: float = 0.5,
    min_ratio: float = 0.0,
) -> dict:
    """The LR schedule's gin settings, resolved once inside the stage's scope.

    ``step``: ×decay_factor every ``decay_every`` epochs from ``decay_start_epoch`` (the PSLA/AST
    MultiStepLR, stepped per epoch); ``cosine``: to ``min_ratio`` at the end; ``constant``.
    ``warmup_steps``: linear ramp over the first optimizer steps (1000 in PSLA/AST).
    """
    if kind not in ("cosine", "step", "constant"):
        raise ValueError(f"schedule.kind = {kind!r} is not one of 'cosine', 'step', 'constant'")
    return dict(kind=kind, warmup_steps=warmup_steps, decay_start_epoch=decay_start_epoch,
                decay_every=decay_every, decay_factor=decay_factor, min_ratio=min_ratio)


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, *, kind: str, warmup_steps: int,
              decay_start_epoch: int, decay_every: int, decay_factor: float, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if kind == "constant":
        return warm
    if kind == "step":
        epoch = step // max(1, steps_per_epoch)
        drops = 0 if epoch < decay_start_epoch else (epoch - decay_start_epoch) // decay_every + 1
        return warm * decay_factor**drops
    progress = min(1.0, step / max(1, total_steps))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    settings = schedule_settings()
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, total_steps, **settings)
    )
