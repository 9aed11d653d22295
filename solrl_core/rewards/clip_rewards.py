"""CLIP-family rewards through transformers (CLIPModel + CLIPProcessor from a local folder).

pickscore: PickScore_v1; score = logit_scale * cos(image, text) (about 20-23 for real images; papers
that report ~0.89 divide by 26). clipscore: CLIP ViT-L/14; score = cos(image, text), unscaled (the
CLIPScore paper's 2.5 * max(cos, 0) is a fixed rescale, left to the weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .base import Reward
from .files import RequiredFile, find_required


def _features(out) -> torch.Tensor:
    # transformers 5 may return an output object from get_*_features; older versions a tensor
    return getattr(out, "pooler_output", out) if not isinstance(out, torch.Tensor) else out


class _ClipReward(Reward):
    folder_names: tuple[str, ...] = ()
    source: str = ""
    use_logit_scale: bool = False

    def __init__(self, *args, model=None, processor=None, **kwargs):
        """`model`/`processor`: an already built CLIPModel / CLIPProcessor (then no folder is needed)."""
        super().__init__(*args, **kwargs)
        self._model, self._processor = model, processor
        self._given = model is not None

    def required_files(self) -> list[RequiredFile]:
        if self._given:
            return []
        return [find_required(self.name, self.folder_names, self.name, self.source, is_dir=True,
                              path=self.path, search_dirs=self.search_dirs)]

    def _load(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        if self._model is None:
            folder = self._file()
            self._model = CLIPModel.from_pretrained(folder)
            self._processor = CLIPProcessor.from_pretrained(folder)
        self._model = self._model.to(self.device, self.dtype).eval()

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        px = self._processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        txt = self._processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = {k: v.to(self.device) for k, v in txt.items()}
        img_f = F.normalize(_features(self._model.get_image_features(pixel_values=px)).float(), dim=-1)
        txt_f = F.normalize(_features(self._model.get_text_features(**txt)).float(), dim=-1)
        cos = (img_f * txt_f).sum(-1)
        return self._model.logit_scale.exp().float() * cos if self.use_logit_scale else cos


class PickScoreReward(_ClipReward):
    name = "pickscore"
    folder_names = ("pickscore", "PickScore_v1")
    source = ("download the Hugging Face repo yuvalkirstain/PickScore_v1 as a folder (model + its CLIP-H "
              "processor files: preprocessor_config.json, tokenizer files)")
    use_logit_scale = True


class ClipScoreReward(_ClipReward):
    name = "clipscore"
    folder_names = ("clipscore", "clip-vit-large-patch14")
    source = "download the Hugging Face repo openai/clip-vit-large-patch14 as a folder"
