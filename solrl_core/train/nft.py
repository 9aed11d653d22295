"""The DiffusionNFT loss (algorithm section 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_SCALE = 5.0
WEIGHT_MIN = 1e-5


@dataclass
class NFTLoss:
    loss: Tensor  # scalar, differentiable through v only
    policy_loss: Tensor
    kl: Tensor


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def noised(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps (diffusers flow-matching convention)."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * eps


def nft_loss(v: Tensor, v_old: Tensor, v_ref: Tensor | None, x_t: Tensor, x0: Tensor, t: Tensor,
             r_opt: Tensor, beta: float = 1.0, kl_coef: float = 1e-4) -> NFTLoss:
    """DiffusionNFT loss for one micro-batch at one timestep per sample.

    v: trained velocity (with grad); v_old: sampling policy's (no grad); v_ref: base model's (no
    grad; None skips the KL term); r_opt: optimality probability r' in [0, 1], one per sample.
    The implicit positive / negative policies mix v and v_old; each branch's x0 error is divided by
    its own detached mean absolute error (adaptive weight), as in the paper.
    """
    v_old = v_old.detach()
    tt = _per_sample(t, x0)
    reduce_dims = tuple(range(1, x0.ndim))

    def branch(v_mix: Tensor) -> Tensor:
        x0_pred = x_t - tt * v_mix
        err = x0_pred - x0
        weight = err.detach().abs().mean(dim=reduce_dims, keepdim=True).clamp_min(WEIGHT_MIN)
        return (err * err / weight).mean(dim=reduce_dims)

    l_pos = branch(beta * v + (1 - beta) * v_old)
    l_neg = branch((1 + beta) * v_old - beta * v)
    r = r_opt.to(l_pos.dtype)
    policy_loss = ((r * l_pos / beta + (1 - r) * l_neg / beta) * LOSS_SCALE).mean()
    kl = ((v - v_ref.detach()) ** 2).mean() if v_ref is not None else torch.zeros((), device=v.device)
    return NFTLoss(policy_loss + kl_coef * kl, policy_loss.detach(), kl.detach())
