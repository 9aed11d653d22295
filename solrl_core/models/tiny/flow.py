"""The tiny model's conditioning and flow-matching conventions (diffusers' own):
x_t = (1 - sigma) * x0 + sigma * noise, the transformer predicts v = noise - x0 and is called with
timestep = sigma * 1000 * timestep_scale, as SanaPipeline does.

The product path is solrl_core.models.load_policy("embedded") + solrl_core.sampling.sample. The
training script works on the bare modules (TinyModel); the SANA adapter is checked against these
conventions, and `sample` (its previews) integrates with the product's seeded noise and Euler solver.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SanaTransformer2DModel
from transformers import Gemma2Model, GemmaTokenizer

from ...sampling.solvers import euler
from ..base import seeded_noise
from ..loading import EMBEDDED_DIR
from ..schedules import scheduler_sigmas
from .config import MAX_PROMPT_TOKENS, build_scheduler

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class TinyModel:
    transformer: SanaTransformer2DModel
    text_encoder: Gemma2Model
    tokenizer: GemmaTokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path = EMBEDDED_DIR) -> TinyModel:
        path = Path(path)
        if not (path / "transformer" / "config.json").is_file():
            raise FileNotFoundError(
                f"tiny model weights not found: no transformer/config.json in {path}; "
                "train them with `python -m solrl_core.models.tiny.train --out DIR`")
        return cls(SanaTransformer2DModel.from_pretrained(path / "transformer"),
                   Gemma2Model.from_pretrained(path / "text_encoder"),
                   GemmaTokenizer.from_pretrained(path / "tokenizer"))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, L, C) and their attention mask (B, L)."""
        enc = self.tokenizer(prompts, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                             return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        return self.text_encoder(ids, attention_mask=mask).last_hidden_state, mask

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = sigma * NUM_TRAIN_TIMESTEPS * self.transformer.config.timestep_scale
        return self.transformer(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t).sample


@torch.no_grad()
def sample(model: TinyModel, prompts: list[str], seeds: list[int], steps: int = 10) -> torch.Tensor:
    """Euler on the scheduler's sigma grid (1 ... 1/1000, then 0, as SanaPipeline), no CFG, with the
    product's seeded noise and solver; images in [-1, 1]."""
    emb, mask = model.encode(prompts)
    size = model.transformer.config.sample_size
    x = seeded_noise(seeds, (3, size, size), emb.device)
    sigmas = scheduler_sigmas(build_scheduler(), steps).to(emb.device)
    return euler(lambda x, sigma: model.velocity(x, sigma.expand(len(x)), emb, mask), x, sigmas)
