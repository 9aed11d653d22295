"""Group-normalised advantages and the optimality probability r' (algorithm section 1, step 5)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..runtime import distributed as dp

ADV_CLIP = 5.0
STD_EPS = 1e-4


def global_std(values: Tensor) -> Tensor:
    """Population std (ddof 0, numpy's default, as the reference) over all finite values in the
    batch, across processes when torch.distributed is running."""
    finite = torch.isfinite(values)
    v = torch.where(finite, values, torch.zeros_like(values)).double()
    n, s, ss = dp.sum_(torch.stack([finite.sum().double(), v.sum(), (v * v).sum()]))
    if n < 1:
        return torch.zeros((), dtype=values.dtype)
    mean = s / n
    var = ss / n - mean * mean
    return var.clamp_min(0).sqrt().to(values.dtype)


def advantages(rewards: Tensor, clip: float = ADV_CLIP, eps: float = STD_EPS) -> tuple[Tensor, Tensor]:
    """rewards [P, K] (NaN = dropped sample) -> (A [P, K], r' [P, K]); dropped samples get NaN.

    A = (r - mean of the prompt's finite rewards) / (std over all finite rewards of the batch + eps),
    clipped to [-clip, clip]; r' = clamp(A / clip / 2 + 0.5, 0, 1). No history across iterations.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {tuple(rewards.shape)}")
    finite = torch.isfinite(rewards)
    counts = finite.sum(dim=1, keepdim=True).clamp_min(1)
    means = torch.where(finite, rewards, torch.zeros_like(rewards)).sum(dim=1, keepdim=True) / counts
    adv = ((rewards - means) / (global_std(rewards) + eps)).clamp(-clip, clip)
    r_opt = (adv / clip / 2 + 0.5).clamp(0, 1)
    nan = torch.full_like(rewards, float("nan"))
    return torch.where(finite, adv, nan), torch.where(finite, r_opt, nan)
