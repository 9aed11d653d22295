"""OCR reward: how closely the text read from the image matches the quoted text of the prompt.

score = 1 - min(levenshtein(ocr, target), len(target)) / len(target), both lower-cased with spaces
removed. The engine is rapidocr-onnxruntime (PP-OCR ONNX weights ship inside its wheel: offline).
"""
from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from ..runtime.extras import extra_import_error
from .base import Reward, RewardDependencyError, logger

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> str | None:
    """The text a prompt asks to render: its double-quoted parts ("..." or “...”), joined; None if none."""
    parts = [a or b for a, b in _QUOTED.findall(prompt)]
    return " ".join(parts) if parts else None


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _normalise(text: str) -> str:
    return "".join(text.lower().split())


def text_match(read: str, target: str) -> float:
    read, target = _normalise(read), _normalise(target)
    if not target:
        return float("nan")
    return 1.0 - min(levenshtein(read, target), len(target)) / len(target)


class OcrReward(Reward):
    name = "ocr"
    default_batch_size = 8

    def check_files(self) -> None:
        try:  # imported here, at validation, so a broken install fails before any compute
            import rapidocr_onnxruntime  # noqa: F401  (its OCR weights ship inside the wheel)
        except ImportError as e:
            raise RewardDependencyError(str(extra_import_error("ocr", "reward 'ocr'", e))) from e

    def _load(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        # The default detector resizes the *shorter* side up to 736 px (a 320x96 banner becomes 2450x736,
        # 5x slower); capping the longer side at 960 keeps generated images (512-1024 px) near native size.
        self._engine = RapidOCR(det_limit_type="max", det_limit_side_len=960,
                                intra_op_num_threads=torch.get_num_threads())

    def read_text(self, image: Image.Image) -> str:
        self.load()
        # PIL input: the engine converts RGB to the BGR order its models expect.
        result, _ = self._engine(image)
        return "".join(text for _box, text, _conf in (result or []))

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        scores = []
        for image, prompt in zip(images, prompts):
            target = quoted_text(prompt)
            if target is None:
                logger.warning("reward 'ocr': prompt %r has no quoted text to read; scored NaN", prompt)
                scores.append(float("nan"))
                continue
            scores.append(text_match(self.read_text(image), target))
        return torch.tensor(np.asarray(scores, dtype=np.float32))
