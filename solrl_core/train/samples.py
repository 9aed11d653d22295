"""SampleBatch: what flows between Sampler, Ranker, Regenerator and NFT Update."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class SampleBatch:
    """P prompts x M samples each; tensors are laid out [P, M, ...].

    `precision` says which model made `latents` ("low": the quantized explorer, "full"). The
    session handle travels along so downstream nodes need only this one input.
    """

    session: object
    prompts: list[str]
    seeds: Tensor  # [P, M] int64
    latents: Tensor  # [P, M, C, h, w] final clean latents x0
    rewards: Tensor  # [P, M] float32, NaN = could not be scored
    components: dict[str, Tensor] = field(default_factory=dict)  # per-reward [P, M]
    precision: str = "full"
    steps: int = 0
    proxy_rewards: Tensor | None = None  # [P, M] the low-precision rewards, kept for reporting
    pool_seeds: Tensor | None = None  # [P, N] the whole draft pool (for the fidelity audit)
    pool_rewards: Tensor | None = None  # [P, N]
    images: Tensor | None = None  # [P, M, 3, H, W] in [0, 1], for previews
    prompt_ids: list[int] = field(default_factory=list)  # each row's position in the iteration's prompts

    def __post_init__(self) -> None:
        track = getattr(self.session, "track", None)
        if track is not None:
            track(self)

    def release(self) -> None:
        """Drop the heavy tensors once the iteration is committed: ComfyUI keeps every loop
        iteration's node outputs alive, so a handle must not pin the images and latents."""
        self.latents = self.images = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.seeds.shape)

    def subset(self, keep: Tensor) -> SampleBatch:
        """Keep samples by per-prompt index [P, K]."""
        def pick(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            idx = keep.to(t.device).reshape(*keep.shape, *([1] * (t.ndim - 2))).expand(*keep.shape, *t.shape[2:])
            return torch.gather(t, 1, idx)

        return replace(self, seeds=pick(self.seeds), latents=pick(self.latents), rewards=pick(self.rewards),
                       components={k: pick(v) for k, v in self.components.items()},
                       proxy_rewards=pick(self.rewards if self.proxy_rewards is None else self.proxy_rewards),
                       pool_seeds=self.seeds if self.pool_seeds is None else self.pool_seeds,
                       pool_rewards=self.rewards if self.pool_rewards is None else self.pool_rewards,
                       images=pick(self.images))
