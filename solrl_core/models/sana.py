"""SANA adapter (SanaTransformer2DModel + Gemma text encoder + optional DC-AE).

Without a VAE (the embedded tiny model) latents ARE pixels in [-1, 1]: latent shape
(in_channels, H, W) and decode = (x + 1) / 2.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning, ConditioningShape, FlowPolicy, batch_sigma, compute_dtype


def default_complex_human_instruction() -> tuple[str, ...]:
    """The instruction SanaPipeline prepends to every prompt by default (read from diffusers)."""
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return tuple(default or ())


class SanaPolicy(FlowPolicy):
    family = "sana"
    default_solver = "euler"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, tokenizer, vae: nn.Module | None = None,
                 scheduler=None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str = "", complex_human_instruction: Sequence[str] | None = None,
                 max_sequence_length: int = 300, resolution: tuple[int, int] | None = None) -> None:
        super().__init__(transformer, device, dtype, source)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.scheduler = scheduler
        # None/empty: encode the plain prompt (tiny model); SANA checkpoints were trained with it on.
        self.complex_human_instruction = tuple(complex_human_instruction or ())
        self.max_sequence_length = max_sequence_length
        self.spatial_factor = 1 if vae is None else 2 ** (len(vae.config.encoder_block_out_channels) - 1)
        if resolution is None:
            side = int(transformer.config.sample_size) * self.spatial_factor
            resolution = (side, side)
        self.resolution = tuple(resolution)

    # --- text -----------------------------------------------------------------------------
    def _encode_uncached(self, prompt: str) -> Conditioning:
        text = prompt.lower().strip()  # SanaPipeline's preprocessing without caption cleaning
        max_length = self.max_sequence_length
        if self.complex_human_instruction:
            chi = "\n".join(self.complex_human_instruction)
            text = chi + text
            max_length = len(self.tokenizer.encode(chi)) + self.max_sequence_length - 2
        self.tokenizer.padding_side = "right"
        tokens = self.tokenizer([text], padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.text_encoder.device)
        mask = tokens.attention_mask.to(self.text_encoder.device)
        embeds = self.text_encoder(ids, attention_mask=mask)[0]
        # Keep the first token (BOS) and the last max_sequence_length - 1 (SANA paper, sec. 3.1):
        # drops the instruction, keeps the user prompt.
        keep = [0, *range(-self.max_sequence_length + 1, 0)]
        return Conditioning(embeds=embeds[:, keep].to(self.dtype), mask=mask[:, keep])

    def conditioning_shape(self) -> ConditioningShape:
        return ConditioningShape(self.max_sequence_length, int(self.transformer.config.caption_channels), masked=True)

    # --- latents --------------------------------------------------------------------------
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height = height or self.resolution[0]
        width = width or self.resolution[1]
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"SANA image size {height}x{width} must be a multiple of {f} (the VAE factor)")
        return (int(self.transformer.config.in_channels), height // f, width // f)

    def image_size_of(self, latents: Tensor) -> tuple[int, int]:
        return latents.shape[-2] * self.spatial_factor, latents.shape[-1] * self.spatial_factor

    # --- model ----------------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        sigma = batch_sigma(sigma, x.shape[0], x.device)
        timestep = sigma * 1000.0 * self.transformer.config.timestep_scale
        dtype = compute_dtype(model, self.dtype)
        out = model(x.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                    encoder_attention_mask=cond.mask, timestep=timestep, return_dict=False)[0].float()
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:  # learned-sigma checkpoints: the velocity is the first half
            out = out[:, :channels]
        return out

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def sigmas(self, steps: int, height: int | None = None, width: int | None = None) -> Tensor:
        """linspace(1, 0, steps + 1), no shift (the Sol-RL SANA schedule)."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
