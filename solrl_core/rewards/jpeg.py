"""DDPO's weight-free rewards: JPEG file size at quality 95, in kB (1 kB = 1000 bytes)."""
from __future__ import annotations

import io

import torch
from PIL import Image

from .base import Reward


def jpeg_kilobytes(image: Image.Image, quality: int = 95) -> float:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegCompressibility(Reward):
    """-size: rewards images that compress well (smooth, simple)."""

    name = "jpeg_compressibility"
    sign = -1.0

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.sign * jpeg_kilobytes(im) for im in images], dtype=torch.float32)


class JpegIncompressibility(JpegCompressibility):
    """+size: rewards detailed, high-frequency images."""

    name = "jpeg_incompressibility"
    sign = 1.0
