"""SD3 / SD3.5 adapter (SD3Transformer2DModel, CLIP-L + CLIP-G + T5, 16-channel VAE)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Conditioning, ConditioningShape, FlowPolicy, batch_sigma, compute_dtype, decode_shifted_kl
from .schedules import flux_shift_mu, scheduler_sigmas

CLIP_TOKENS = 77


class SD3Policy(FlowPolicy):
    family = "sd3"
    default_solver = "dpm2"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out")

    def __init__(self, components: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str = "", max_sequence_length: int = 256,
                 resolution: tuple[int, int] | None = None) -> None:
        from diffusers import StableDiffusion3Pipeline

        super().__init__(components["transformer"], device, dtype, source)
        names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                 "text_encoder_3", "tokenizer_3")
        self.pipeline = StableDiffusion3Pipeline(**{k: components.get(k) for k in names})
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.text_encoder_2 = components["text_encoder_2"]
        self.text_encoder_3 = components.get("text_encoder_3")
        self.scheduler = components["scheduler"]
        self.max_sequence_length = max_sequence_length
        self.spatial_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution is None:
            side = int(self.transformer.config.sample_size) * self.spatial_factor
            resolution = (side, side)
        self.resolution = tuple(resolution)

    def _encode_uncached(self, prompt: str) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))

    def conditioning_shape(self) -> ConditioningShape:
        # CLIP-L and CLIP-G (77 tokens, widths concatenated, padded to T5's) followed by T5's tokens.
        config = self.transformer.config
        return ConditioningShape(CLIP_TOKENS + self.max_sequence_length, int(config.joint_attention_dim),
                                 int(config.pooled_projection_dim))

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height = height or self.resolution[0]
        width = width or self.resolution[1]
        step = self.spatial_factor * int(self.transformer.config.patch_size)
        if height % step or width % step:
            raise ValueError(f"SD3 image size {height}x{width} must be a multiple of {step}")
        return (int(self.transformer.config.in_channels), height // self.spatial_factor,
                width // self.spatial_factor)

    def image_size_of(self, latents: Tensor) -> tuple[int, int]:
        return latents.shape[-2] * self.spatial_factor, latents.shape[-1] * self.spatial_factor

    def velocity(self, model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        sigma = batch_sigma(sigma, x.shape[0], x.device)
        dtype = compute_dtype(model, self.dtype)
        out = model(hidden_states=x.to(dtype), timestep=sigma * 1000.0,
                    encoder_hidden_states=cond.embeds.to(dtype),
                    pooled_projections=cond.pooled.to(dtype), return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return decode_shifted_kl(self.vae, latents)

    def sigmas(self, steps: int, height: int | None = None, width: int | None = None) -> Tensor:
        """The scheduler's default schedule (SD3.5: shift 3.0), as StableDiffusion3Pipeline uses it."""
        mu = None
        if self.scheduler.config.get("use_dynamic_shifting", None):
            _, h, w = self.latent_shape(height, width)
            patch = int(self.transformer.config.patch_size)
            mu = flux_shift_mu((h // patch) * (w // patch), {"max_shift": 1.16, **self.scheduler.config})
        return scheduler_sigmas(self.scheduler, steps, mu=mu)
