"""Decay schedules of the sampling ("old") adapter and of the EMA copy (algorithm step 7)."""
from __future__ import annotations

import torch
from torch import Tensor


def old_decay(step: int) -> float:
    """old <- d * old + (1 - d) * current, d = min(0.001 * step, 0.5); `step` counts optimizer steps
    taken so far, this one included (1 at the first update): almost fully on-policy at first."""
    return min(0.001 * step, 0.5)


def ema_decay(step: int) -> float:
    """EMA (evaluation / export copy) decay: min((1 + s) / (10 + s), 0.9), s counted as in old_decay."""
    return min((1 + step) / (10 + step), 0.9)


@torch.no_grad()
def blend_(target: dict[str, Tensor], current: dict[str, Tensor], decay: float) -> None:
    """target <- decay * target + (1 - decay) * current, in place, key by key."""
    for name, value in current.items():
        target[name].mul_(decay).add_(value.detach().to(target[name].dtype), alpha=1 - decay)
