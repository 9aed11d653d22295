"""Which drafts to keep per prompt (algorithm section 1, step 3), with ties and NaN defined.

Ordering is total and deterministic: by proxy reward, ties broken by draft position (earlier
first). Drafts whose proxy reward is NaN are kept only when too few finite ones remain, and then
after all finite ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

MODES = ("best_worst", "mean_deviation", "random")


def check_sizes(n: int, k: int, mode: str) -> None:
    """The one definition of valid pool / keep sizes (validation uses it before any compute)."""
    if mode not in MODES:
        raise ValueError(f"selection mode {mode!r} is not one of {MODES}")
    if k < 1 or n < 1:
        raise ValueError(f"pool size N={n} and kept K={k} must be positive")
    if k > n:
        raise ValueError(f"cannot keep K={k} of a pool of N={n} drafts per prompt: K must be <= N")
    if mode == "best_worst" and k % 2:
        raise ValueError(f"best_worst keeps K/2 best and K/2 worst, so K must be even (got K={k})")


def _order(values: Tensor, descending: bool) -> Tensor:
    """Indices sorting one row: finite values first (asc/desc), ties by position, NaN last."""
    n = values.numel()
    pos = torch.arange(n, dtype=torch.float64)
    finite = torch.isfinite(values)
    key = values.double() * (-1 if descending else 1)
    # Stable sort by (is NaN, key, position).
    key = torch.where(finite, key, torch.zeros_like(key))
    idx = torch.argsort(pos, stable=True)
    idx = idx[torch.argsort(key[idx], stable=True)]
    idx = idx[torch.argsort((~finite[idx]).to(torch.int8), stable=True)]
    return idx


def kept_indices(proxy: Tensor, k: int, mode: str = "best_worst",
                 generator: torch.Generator | None = None) -> Tensor:
    """proxy [P, N] -> kept indices [P, K] (each row sorted ascending by draft position)."""
    p, n = proxy.shape
    check_sizes(n, k, mode)
    rows = []
    for row in proxy:
        if mode == "best_worst":
            best = _order(row, descending=True)[: k // 2]
            rest = torch.ones(n, dtype=torch.bool)
            rest[best] = False
            # Worst: lowest finite among the rest (NaN only if nothing finite is left).
            rest_idx = torch.nonzero(rest).squeeze(1)
            worst = rest_idx[_order(row[rest_idx], descending=False)[: k - k // 2]]
            keep = torch.cat([best, worst])
        elif mode == "mean_deviation":
            finite = torch.isfinite(row)
            mean = row[finite].mean() if finite.any() else torch.tensor(0.0)
            keep = _order((row - mean).abs(), descending=True)[:k]
        else:
            keep = torch.randperm(n, generator=generator)[:k]
        rows.append(torch.sort(keep).values)
    return torch.stack(rows)
