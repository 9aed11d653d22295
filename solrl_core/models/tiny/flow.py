"""The tiny model's conditioning and flow-matching conventions (diffusers' own):
x_t = (1 - sigma) * x0 + sigma * noise, the transformer predicts v = noise - x0 and is called with
timestep = sigma * 1000 * timestep_scale, as SanaPipeline does. Sampling is plain Euler, no CFG.

The product path is solrl_core.models.load_policy("embedded") + solrl_core.sampling.sample; these
functions are the reference the training script uses and the adapter is checked against.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SanaTransformer2DModel
from transformers import Gemma2Model, GemmaTokenizer

from .config import MAX_PROMPT_TOKENS, build_scheduler

WEIGHTS_DIR = Path(__file__).parent / "weights"
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class TinyModel:
    transformer: SanaTransformer2DModel
    text_encoder: Gemma2Model
    tokenizer: GemmaTokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path = WEIGHTS_DIR) -> TinyModel:
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


def initial_noise(seeds: list[int], size: int = 32) -> torch.Tensor:
    """One independent noise image per seed, so an image depends on its seed only (not on the batch)."""
    return torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])


def sigma_schedule(steps: int) -> torch.Tensor:
    """The steps + 1 sigmas FlowMatchEulerDiscreteScheduler (shift 1) walks: 1 ... 1/1000, then 0."""
    scheduler = build_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float()


@torch.no_grad()
def sample(model: TinyModel, prompts: list[str], seeds: list[int], steps: int = 10) -> torch.Tensor:
    """Euler sampling on the scheduler's sigma grid (as SanaPipeline), no CFG; images in [-1, 1]."""
    emb, mask = model.encode(prompts)
    x = initial_noise(seeds, model.transformer.config.sample_size).to(emb.device)
    sigmas = sigma_schedule(steps)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = model.velocity(x, s.expand(len(x)).to(x.device), emb, mask)
        x = x + (s_next - s) * v
    return x
