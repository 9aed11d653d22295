"""Several rewards as one weighted sum, with the per-component scores kept for reporting."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Reward
from .files import RequiredFile
from .images import ImageBatch


class WeightedReward(Reward):
    """total = sum_i weight_i * reward_i(images, prompts). A NaN in any component stays NaN in the total
    (a failed score must not pass as a good or bad one)."""

    def __init__(self, rewards: Sequence[tuple[Reward, float]]):
        super().__init__()
        if not rewards:
            raise ValueError("WeightedReward needs at least one (reward, weight) pair")
        self.rewards = [(r, float(w)) for r, w in rewards]
        self.device = self.rewards[0][0].device  # where its parts score (Load Reward builds them on one device)
        self.keys = _unique_keys([r.name for r, _ in self.rewards])
        self.name = ",".join(f"{k}:{w:g}" for k, (_, w) in zip(self.keys, self.rewards))

    def required_files(self) -> list[RequiredFile]:
        return [f for r, _ in self.rewards for f in r.required_files()]

    def check_files(self) -> None:
        for r, _ in self.rewards:
            r.check_files()

    def load(self) -> WeightedReward:
        for r, _ in self.rewards:
            r.load()
        return self

    def to(self, device) -> WeightedReward:
        self.device = torch.device(device)
        for r, _ in self.rewards:
            r.to(device)
        return self

    def score(self, images: ImageBatch, prompts: Sequence[str] | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total Tensor[B], {component name: Tensor[B] unweighted})."""
        components = {k: r(images, prompts) for k, (r, _) in zip(self.keys, self.rewards)}
        total = torch.zeros_like(next(iter(components.values())))
        for k, (_, w) in zip(self.keys, self.rewards):
            total = total + w * components[k]
        return total, components

    def __call__(self, images: ImageBatch, prompts: Sequence[str] | str) -> torch.Tensor:
        return self.score(images, prompts)[0]


def _unique_keys(names: list[str]) -> list[str]:
    """Component names for the report; a reward used twice becomes name, name#2, ..."""
    seen: dict[str, int] = {}
    keys = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        keys.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return keys
