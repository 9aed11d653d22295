"""Ranking fidelity: how well low-precision proxy rewards rank drafts like full precision does."""
from __future__ import annotations

import torch
from torch import Tensor


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), as scipy.stats.rankdata."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    n = x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")


def kendall_tau_b(a: Tensor, b: Tensor) -> float:
    da = torch.sign(a[:, None] - a[None, :]).double()
    db = torch.sign(b[:, None] - b[None, :]).double()
    upper = torch.triu(torch.ones_like(da, dtype=torch.bool), diagonal=1)
    concord = (da * db)[upper].sum()
    ta, tb = (da[upper] != 0).sum(), (db[upper] != 0).sum()
    denom = (ta * tb).double().sqrt().item()
    return float(concord.item() / denom) if denom > 0 else float("nan")


def top_k_overlap(proxy: Tensor, full: Tensor, k: int) -> float:
    """Share of the proxy's top-k (ties to the earlier draft, as the ranker keeps them) that full
    precision also ranks in its top-k; a draft tied with full precision's k-th best counts as in, so
    the figure never depends on how ties are ordered."""
    k = min(k, proxy.numel())
    picked = torch.argsort(-proxy.double(), stable=True)[:k]
    kth = torch.sort(full.double(), descending=True).values[k - 1]
    return (full[picked].double() >= kth).double().mean().item()


def bottom_k_overlap(proxy: Tensor, full: Tensor, k: int) -> float:
    """top_k_overlap of the worst: the share of the proxy's bottom-k that full precision ranks bottom-k."""
    return top_k_overlap(-proxy, -full, k)


def ranking_agreement(proxy: Tensor, full: Tensor, k: int = 4) -> dict[str, float]:
    """Mean over prompt groups ([P, M] each) of Spearman, Kendall tau-b, top-k and bottom-k overlap."""
    rows = [(p, f) for p, f in zip(proxy, full) if torch.isfinite(p).all() and torch.isfinite(f).all()]
    if not rows:
        return {}
    stats = {"spearman": [spearman(p, f) for p, f in rows], "kendall": [kendall_tau_b(p, f) for p, f in rows],
             f"top{k}_overlap": [top_k_overlap(p, f, k) for p, f in rows],
             f"bottom{k}_overlap": [bottom_k_overlap(p, f, k) for p, f in rows]}
    return {name: float(torch.tensor(v).nanmean()) for name, v in stats.items()}
