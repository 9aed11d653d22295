"""FLUX.1 adapter (FluxTransformer2DModel, CLIP pooled + T5 sequence, 16-channel VAE).

Latents are kept unpacked [B, C, h, w]; `velocity` packs 2x2 patches into tokens and back.
Guidance-distilled checkpoints (FLUX.1-dev) get their guidance embedding (default 1.0, no CFG).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .base import Conditioning, ConditioningShape, FlowPolicy, batch_sigma, compute_dtype, decode_shifted_kl
from .schedules import flux_shift_mu, scheduler_sigmas


class FluxPolicy(FlowPolicy):
    family = "flux"
    default_solver = "dpm2"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, components: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str = "", guidance: float = 1.0, max_sequence_length: int = 512,
                 resolution: tuple[int, int] | None = None) -> None:
        from diffusers import FluxPipeline

        super().__init__(components["transformer"], device, dtype, source)
        self.pipeline = FluxPipeline(**{k: components.get(k) for k in
                                        ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                         "tokenizer_2", "transformer")})
        self.vae = components["vae"]
        self.text_encoder, self.text_encoder_2 = components["text_encoder"], components["text_encoder_2"]
        self.scheduler = components["scheduler"]
        self.guidance = guidance
        self.max_sequence_length = max_sequence_length
        self.spatial_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = tuple(resolution) if resolution else (512, 512)

    def _encode_uncached(self, prompt: str) -> Conditioning:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=[prompt], prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))

    def conditioning_shape(self) -> ConditioningShape:
        config = self.transformer.config
        return ConditioningShape(self.max_sequence_length, int(config.joint_attention_dim),
                                 int(config.pooled_projection_dim))

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height = height or self.resolution[0]
        width = width or self.resolution[1]
        step = 2 * self.spatial_factor  # VAE factor times the 2x2 token packing
        if height % step or width % step:
            raise ValueError(f"FLUX image size {height}x{width} must be a multiple of {step}")
        return (int(self.transformer.config.in_channels) // 4, height // self.spatial_factor,
                width // self.spatial_factor)

    def image_size_of(self, latents: Tensor) -> tuple[int, int]:
        return latents.shape[-2] * self.spatial_factor, latents.shape[-1] * self.spatial_factor

    def velocity(self, model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        b, c, h, w = x.shape
        sigma = batch_sigma(sigma, b, x.device)
        dtype = compute_dtype(model, self.dtype)
        tokens = pack(x.to(dtype))
        img_ids = image_ids(h // 2, w // 2, x.device, dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([b], self.guidance, device=x.device, dtype=torch.float32)
        # timestep = (1000 * sigma) / 1000 as in FluxPipeline, so the rounding matches it exactly.
        out = model(hidden_states=tokens, timestep=(sigma * 1000.0).to(dtype) / 1000, guidance=guidance,
                    pooled_projections=cond.pooled.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack(out.float(), c, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return decode_shifted_kl(self.vae, latents)

    def sigmas(self, steps: int, height: int | None = None, width: int | None = None) -> Tensor:
        """Linear sigmas 1 -> 1/steps, shifted by the resolution-dependent mu, then 0 (FluxPipeline)."""
        _, h, w = self.latent_shape(height, width)
        mu = flux_shift_mu((h // 2) * (w // 2), self.scheduler.config)
        return scheduler_sigmas(self.scheduler, steps, np.linspace(1.0, 1 / steps, steps), mu=mu)


def pack(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C] tokens of 2x2 patches (FLUX layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, c: int, h: int, w: int) -> Tensor:
    """Inverse of `pack`."""
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """(row, col) position ids of the packed image tokens, [h*w, 3] with channel 0 zero."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)
