"""Reward names -> classes, and the string form workflows use ("pickscore:1,hpsv2:0.5")."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .base import Reward
from .clip_rewards import ClipScoreReward, PickScoreReward
from .hpsv2 import HPSv2Reward
from .imagereward import ImageRewardScorer
from .jpeg import JpegCompressibility, JpegIncompressibility
from .ocr import OcrReward
from .shapes import ShapesReward
from .weighted import WeightedReward

REWARDS: dict[str, type[Reward]] = {
    cls.name: cls
    for cls in (HPSv2Reward, PickScoreReward, ClipScoreReward, ImageRewardScorer, OcrReward, ShapesReward,
                JpegCompressibility, JpegIncompressibility)
}


def load_reward(name: str, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, search_dirs: Sequence[str | os.PathLike] = (),
                **options) -> Reward:
    """Build a reward by name. Lazy: files are located now (see check_files) but loaded on first call.
    `options` go to the reward's class (e.g. batch_size, or arch for hpsv2)."""
    key = name.strip().lower()
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    return REWARDS[key](path=path, device=device, dtype=dtype, search_dirs=search_dirs, **options)


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'pickscore:1,hpsv2:0.5,clipscore' -> [('pickscore', 1.0), ('hpsv2', 0.5), ('clipscore', 1.0)]."""
    out: list[tuple[str, float]] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, weight = part.partition(":")
        name = name.strip().lower()
        if name not in REWARDS:
            raise ValueError(f"reward spec {spec!r}: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {weight!r} of {name!r} is not a number") from None
        out.append((name, w))
    if not out:
        raise ValueError(f"reward spec {spec!r} names no reward; e.g. 'pickscore:1,hpsv2:1'")
    return out


def load_weighted_reward(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         search_dirs: Sequence[str | os.PathLike] = ()) -> WeightedReward:
    """A WeightedReward from the workflow string form (weights resolved per reward as in load_reward)."""
    return WeightedReward([(load_reward(n, device=device, dtype=dtype, search_dirs=search_dirs), w)
                           for n, w in parse_reward_spec(spec)])
