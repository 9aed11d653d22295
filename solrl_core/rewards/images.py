"""Image batches in the forms rewards accept: float tensor [B,3,H,W] in [0,1], or a list of PIL images."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

ImageBatch = torch.Tensor | Sequence[Image.Image]


def batch_len(images: ImageBatch) -> int:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images tensor must be [B,3,H,W] in [0,1]; got shape {tuple(images.shape)}")
        return images.shape[0]
    return len(images)


def finite_mask(images: ImageBatch) -> torch.Tensor:
    """True per image whose pixels are all finite (a diverged sampler can emit NaN images)."""
    if isinstance(images, torch.Tensor):
        return torch.isfinite(images.detach().float()).flatten(1).all(dim=1).cpu()
    return torch.ones(len(images), dtype=torch.bool)


def to_pil(image: torch.Tensor | Image.Image | np.ndarray) -> Image.Image:
    """One image as 8-bit RGB PIL (what the reward models' own preprocessing expects)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3,H,W] in [0,1]; got shape {tuple(image.shape)}")
        arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr, "RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def to_pil_list(images: ImageBatch) -> list[Image.Image]:
    return [to_pil(im) for im in images]
