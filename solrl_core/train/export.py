"""Export trained weights: a LoRA file that both diffusers and ComfyUI load.

Keys are diffusers' ("transformer.<module>.lora_A.weight" / ".lora_B.weight"), which
`pipe.load_lora_weights` reads and ComfyUI's LoRA loader maps for FLUX.1 and SD3 (it accepts the
"transformer." prefix for those families). The LoRA scale alpha / rank is folded into lora_B,
so loaders that assume alpha = rank (no ".alpha" key) reproduce the adapter exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ..models.lora import adapter_state, is_full_finetune
from .session import EMA, TrainingSession


def _weights(session: TrainingSession, which: str) -> dict[str, Tensor]:
    return session.ema if which == EMA else adapter_state(session.policy.transformer, which)


def lora_state_dict(session: TrainingSession, which: str = EMA) -> dict[str, Tensor]:
    """Adapter `which` ("ema", "default", "old") in diffusers LoRA naming, scale folded into B."""
    scale = session.config.lora_alpha / session.config.lora_rank
    out = {}
    for key, value in _weights(session, which).items():
        value = value.detach().float().cpu().contiguous()
        if ".lora_B." in key:
            value = value * scale
        out[f"transformer.{key}"] = value
    return out


def metadata(session: TrainingSession, which: str) -> dict[str, str]:
    last = session.metrics[-1] if session.metrics else {}
    info = {
        "base_model": session.policy.source,
        "family": session.policy.family,
        "weights": which,
        "iterations": session.iteration,
        "reward_mean": last.get("reward_mean"),
        "lora_rank": session.config.lora_rank,
        "lora_alpha_folded": session.config.lora_alpha,
        "seed": session.config.seed,
        "trainer": "Sol-RL (DiffusionNFT)",
    }
    return {"solrl": json.dumps(info), "format": "pt"}


def save_lora(session: TrainingSession, which: str = EMA, filename: str = "sol_rl_lora") -> list[Path]:
    folder = session.run_dir / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(filename).name.removesuffix(".safetensors")
    path = folder / f"{name}.safetensors"
    if is_full_finetune(session.policy.transformer):
        state = {k: v.detach().float().cpu().contiguous() for k, v in _weights(session, which).items()}
        save_file(state, path, metadata=metadata(session, which))
    else:
        save_file(lora_state_dict(session, which), path, metadata=metadata(session, which))
    return [path]

