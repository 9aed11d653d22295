"""Sigma schedules computed by a fresh copy of the family's diffusers scheduler (never mutated)."""
from __future__ import annotations

import numpy as np
import torch


def scheduler_sigmas(scheduler, steps: int, sigmas=None, mu: float | None = None) -> torch.Tensor:
    """The steps + 1 sigmas (ending at 0) a pipeline would use with this scheduler config."""
    fresh = type(scheduler).from_config(scheduler.config)
    kwargs = {"mu": mu} if mu is not None else {}
    if sigmas is not None:
        fresh.set_timesteps(sigmas=np.asarray(sigmas), device="cpu", **kwargs)
    else:
        fresh.set_timesteps(steps, device="cpu", **kwargs)
    return fresh.sigmas.to(torch.float32)


def flux_shift_mu(image_seq_len: int, config) -> float:
    """FLUX's resolution-dependent shift: mu linear in the number of image tokens."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len
