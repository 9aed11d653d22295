"""The one interface every model family implements: encode, noise, velocity, decode, schedule.

Conventions (diffusers flow matching): x_t = (1 - sigma) * x0 + sigma * noise, the model predicts
v = noise - x0, and the transformer is called with timestep = 1000 * sigma (times any per-family
scale). Latents travel between stages in the family's *unpacked* image layout [B, C, h, w];
adapters that need packed tokens (FLUX) pack and unpack inside `velocity`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn


class ModelNotFoundError(FileNotFoundError):
    """A model folder, file or cached repo id is missing or incomplete (one-line message)."""


@dataclass
class Conditioning:
    """Per-sample text conditioning; every field has the batch as its first dimension.

    embeds: main text-encoder hidden states [B, L, D] (Gemma for SANA, T5 for FLUX, joint for SD3).
    mask:   attention mask of `embeds` [B, L] when the family uses one (SANA).
    pooled: pooled text embedding [B, P] (FLUX: CLIP; SD3: CLIP-L + CLIP-G).
    """

    embeds: Tensor
    mask: Tensor | None = None
    pooled: Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def index(self, idx: Tensor | Sequence[int]) -> Conditioning:
        """Select or repeat rows, e.g. `cond.index([0] * 8)` expands one prompt to 8 seeds."""
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=self.embeds.device)
        return self._map(lambda t: t.index_select(0, idx_t))

    def clone(self) -> Conditioning:
        return self._map(torch.clone)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to a device; `dtype` applies to float tensors only (masks keep theirs)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension (all items must carry the same fields)."""
        first = items[0]
        return replace(first, **{f.name: torch.cat([getattr(c, f.name) for c in items], dim=0)
                                 for f in fields(first) if getattr(first, f.name) is not None})


@dataclass(frozen=True)
class ConditioningShape:
    """What `encode` returns per sample: `tokens` x `width` embeddings, a pooled vector, a mask."""

    tokens: int
    width: int
    pooled: int | None = None
    masked: bool = False


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """One N(0, I) sample of `shape` per seed, each from its own CPU generator.

    A seed alone determines its sample, so the same seed gives the same noise alone or in any
    batch, on any device (drawn on CPU, then moved), exactly as diffusers' `randn_tensor` does when
    given a list of CPU generators.
    """
    draws = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)),
                         dtype=torch.float32) for s in seeds]
    return torch.cat(draws, dim=0).to(device=device, dtype=dtype)


class FlowPolicy:
    """A text-to-image flow model seen through one interface (one subclass per family).

    Subclasses set the class attributes and implement `_encode_uncached`, `latent_shape`,
    `velocity`, `decode` and `sigmas`. `encode` caches per prompt text so a prompt set is encoded
    once; prompts are encoded one at a time so a prompt's embedding never depends on what else
    was encoded with it.
    """

    family: str = ""
    default_solver: str = "euler"
    lora_target_modules: tuple[str, ...] = ()
    resolution: tuple[int, int] = (1024, 1024)

    transformer: nn.Module
    device: torch.device
    dtype: torch.dtype

    def __init__(self, transformer: nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, source: str = "") -> None:
        self.transformer = transformer
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self._prompt_cache: dict[str, Conditioning] = {}

    # --- text -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        if isinstance(prompts, str):
            prompts = [prompts]
        for p in dict.fromkeys(prompts):
            if p not in self._prompt_cache:
                self._prompt_cache[p] = self._encode_uncached(p).to(self.device)
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    def conditioning_shape(self) -> ConditioningShape:
        """Per-sample shapes of `encode`'s output (the memory plan sizes buffers and traces with it)."""
        raise NotImplementedError

    def _encode_uncached(self, prompt: str) -> Conditioning:
        raise NotImplementedError

    def is_cached(self, prompts: Sequence[str]) -> bool:
        """Whether `encode(prompts)` can answer from the cache (no text encoder needed)."""
        return all(p in self._prompt_cache for p in ([prompts] if isinstance(prompts, str) else prompts))

    def text_encoders(self) -> list[nn.Module]:
        """The family's text encoders (what `encode` runs on a cache miss)."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self, n, None) for n in names) if m is not None]

    # --- latents --------------------------------------------------------------------------
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of one latent for an image of height x width pixels."""
        raise NotImplementedError

    def initial_noise(self, seeds: Sequence[int], height: int | None = None,
                      width: int | None = None) -> Tensor:
        return seeded_noise(seeds, self.latent_shape(height, width), self.device, torch.float32)

    def image_size_of(self, latents: Tensor) -> tuple[int, int]:
        """(height, width) in pixels of images whose latents have this shape."""
        raise NotImplementedError

    # --- model ----------------------------------------------------------------------------
    def velocity(self, model: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def sigmas(self, steps: int, height: int | None = None, width: int | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, source={self.source!r}, "
                f"device={self.device}, dtype={self.dtype}, resolution={self.resolution})")


COMPUTE_DTYPE_ATTRIBUTE = "solrl_compute_dtype"


def compute_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype to feed `model`: the policy's (`default`), unless the model was cast to another one
    as a whole and says so (a cpu_bf16 explorer copy of an fp32 policy)."""
    return getattr(model, COMPUTE_DTYPE_ATTRIBUTE, default)


def batch_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A [B] float32 sigma from a scalar or [B] input."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma


def decode_shifted_kl(vae: nn.Module, latents: Tensor) -> Tensor:
    """Images in [0, 1] from latents of a KL VAE with scaling and shift factors (FLUX.1, SD3)."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
