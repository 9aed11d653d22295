"""The Reward interface: lazy weights, file checks before compute, batched scoring, NaN on failure."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from PIL import Image

from .files import RequiredFile
from .images import ImageBatch, batch_len, finite_mask, to_pil

logger = logging.getLogger("solrl.rewards")


class RewardDependencyError(ImportError):
    """A Python package a reward needs is not installed (one line: which package, how to install)."""


class Reward:
    """Base class: score(images, prompts) -> float32 Tensor[B] on CPU.

    Subclasses set `name`, list their files in `required_files()`, build models in `_load()` and score
    one batch of PIL images in `_score_batch()`. Images that cannot be scored get NaN (never a made-up
    value): non-finite input pixels here, and per-item failures (e.g. an unparsable prompt) in subclasses.
    """

    name: str = "reward"
    default_batch_size: int = 16

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, search_dirs: Sequence[str | os.PathLike] = (),
                 batch_size: int | None = None):
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype
        self.search_dirs = tuple(search_dirs)
        self.batch_size = batch_size or self.default_batch_size
        self._loaded = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, loaded={self._loaded})"

    # --- files -------------------------------------------------------------------------------------
    def required_files(self) -> list[RequiredFile]:
        """What this reward needs on disk, where it looked, how to obtain it (empty: nothing needed)."""
        return []

    def check_files(self) -> None:
        """Raise RewardFileNotFoundError (one line) for the first missing file; cheap, loads nothing."""
        for f in self.required_files():
            if not f.exists:
                raise f.error()

    def _file(self, index: int = 0) -> str:
        f = self.required_files()[index]
        if not f.exists:
            raise f.error()
        return f.found  # type: ignore[return-value]

    # --- loading -----------------------------------------------------------------------------------
    def load(self) -> Reward:
        """Load weights now (otherwise done on the first call). Idempotent."""
        if not self._loaded:
            self.check_files()
            self._load()
            self._loaded = True
        return self

    def _load(self) -> None:
        pass

    # --- placement ---------------------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        """The torch modules that score (default: every nn.Module attribute)."""
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def to(self, device: str | torch.device) -> Reward:
        """Move the loaded models, and the inputs of later calls, to `device` (offloading between stages)."""
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    # --- scoring -----------------------------------------------------------------------------------
    def __call__(self, images: ImageBatch, prompts: Sequence[str] | str) -> torch.Tensor:
        n = batch_len(images)
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"reward '{self.name}': got {n} images but {len(prompts)} prompts")
        scores = torch.full((n,), float("nan"), dtype=torch.float32)
        ok = finite_mask(images)
        if not ok.all():
            logger.warning("reward '%s': %d image(s) with non-finite pixels scored NaN", self.name, int((~ok).sum()))
        todo = [i for i in range(n) if ok[i]]
        if not todo:
            return scores
        self.load()
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start:start + self.batch_size]
                batch = [to_pil(images[i]) for i in idx]
                out = self._score_batch(batch, [prompts[i] for i in idx])
                scores[idx] = out.detach().to(device="cpu", dtype=torch.float32).reshape(len(idx))
        return scores

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError
