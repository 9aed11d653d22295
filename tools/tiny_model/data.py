"""Training data: procedurally drawn, captioned scenes, generated on the fly from a seed."""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from solrl_core.scenes import DEFAULT_SIZE, render, sample_scene

# Mostly single objects (the skill the model must have), enough compositions to learn their shape
# (and, by design, too few to master them: that is the headroom RL works on).
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"single": 0.7, "count": 0.15, "relation": 0.15}


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB uint8 image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@dataclass
class SceneStream:
    """An endless, seeded stream of (prompts, images) batches of the shapes world."""

    batch_size: int = 64
    seed: int = 0
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    size: int = DEFAULT_SIZE

    def __iter__(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        rng = random.Random(self.seed)
        kinds, weights = list(self.kind_weights), list(self.kind_weights.values())
        while True:
            prompts, images = [], []
            for kind in rng.choices(kinds, weights, k=self.batch_size):
                prompt, scene = sample_scene(rng, kind, self.size)
                prompts.append(prompt)
                images.append(image_to_tensor(render(scene)))
            yield prompts, torch.stack(images)
