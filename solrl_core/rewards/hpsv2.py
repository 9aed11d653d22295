"""HPSv2 / v2.1: open_clip ViT-H-14 loaded with the HPS checkpoint; score = cos(image, text).

The hpsv2 PyPI package is not used: it pins pytest, its wheel lacks the tokenizer vocabulary it
needs and its score() downloads the 3.9 GB base model. open_clip builds the same architecture
(identical keys) and loads the HPS checkpoint by path with weights_only=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .base import Reward, RewardDependencyError
from .files import RequiredFile, find_required

HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")


class HPSv2Reward(Reward):
    name = "hpsv2"

    def __init__(self, *args, arch: str = "ViT-H-14", model: torch.nn.Module | None = None,
                 preprocess=None, tokenizer=None, **kwargs):
        """`arch`: the open_clip architecture the checkpoint was trained with (tests register a tiny one).
        `model`/`preprocess`/`tokenizer`: an already built open_clip model (then no file is needed)."""
        super().__init__(*args, **kwargs)
        self.arch = arch
        self._model, self._preprocess, self._tokenizer = model, preprocess, tokenizer
        self._given = model is not None

    def required_files(self) -> list[RequiredFile]:
        if self._given:
            return []
        return [find_required(self.name, HPS_FILES, "hpsv2",
                              "download HPS_v2.1_compressed.pt from the Hugging Face repo xswu/HPSv2",
                              path=self.path, search_dirs=self.search_dirs)]

    def _load(self) -> None:
        try:
            import open_clip
        except ImportError as e:
            raise RewardDependencyError("reward 'hpsv2' needs open-clip-torch: pip install open-clip-torch") from e
        if self._model is None:
            self._model, _, self._preprocess = open_clip.create_model_and_transforms(
                self.arch, pretrained=self._file(), weights_only=True)
        elif self._preprocess is None:
            self._preprocess = open_clip.image_transform(self._model.visual.image_size, is_train=False)
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.arch)
        self._model = self._model.to(self.device, self.dtype).eval()

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self._preprocess(im) for im in images]).to(self.device, self.dtype)
        tokens = self._tokenizer(prompts).to(self.device)
        img = F.normalize(self._model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self._model.encode_text(tokens).float(), dim=-1)
        return (img * txt).sum(-1)
