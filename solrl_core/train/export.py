"""Export trained weights that both diffusers and ComfyUI load.

LoRA: one file with diffusers' keys ("transformer.<module>.lora_A.weight" / ".lora_B.weight"), which
`pipe.load_lora_weights` reads and ComfyUI's LoRA loader maps for FLUX.1 and SD3 (it accepts the
"transformer." prefix for those families). The LoRA scale alpha / rank is folded into lora_B,
so loaders that assume alpha = rank (no ".alpha" key) reproduce the adapter exactly.

Full fine-tuning: a diffusers transformer folder (config.json + one diffusion_pytorch_model.safetensors)
in the policy's dtype: `<Family>Transformer2DModel.from_pretrained(folder)` loads it, and the single
safetensors file, in diffusers' key layout, is what ComfyUI's diffusion-model loader reads for FLUX.1
and SD3 (it converts diffusers MMDiT keys itself).
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
        "seed": session.config.seed,
        "trainer": "Sol-RL (DiffusionNFT)",
    }
    if is_full_finetune(session.policy.transformer):
        info["full_finetune"] = True
    else:
        info.update(lora_rank=session.config.lora_rank, lora_alpha_folded=session.config.lora_alpha)
    return {"solrl": json.dumps(info), "format": "pt"}


TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name for unsharded weights


def write_transformer(model, weights: dict[str, Tensor], dtype, folder: Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """A diffusers transformer folder: `model`'s config and its state dict with `weights` in place of its
    own (diffusers' names; persistent buffers kept), floats in `dtype`, as one safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    state = {}
    for key, value in model.state_dict().items():
        value = weights.get(key, value).detach()
        state[key] = value.to("cpu", dtype if value.is_floating_point() else None).contiguous()
    path = folder / TRANSFORMER_WEIGHTS
    save_file(state, path, metadata={"format": "pt", **(metadata or {})})
    return path


def save_transformer(session: TrainingSession, which: str, folder: Path) -> Path:
    """Full fine-tuning: the weights `which` as a diffusers transformer folder in the policy's dtype."""
    return write_transformer(session.policy.transformer, _weights(session, which), session.policy.dtype, folder,
                             metadata(session, which))


def save_lora(session: TrainingSession, which: str = EMA, filename: str = "sol_rl_lora") -> list[Path]:
    """LoRA: `<run>/lora/<filename>.safetensors`. Full fine-tuning: the diffusers transformer folder
    `<run>/transformer/<filename>/`; returns the weights file first, then the folder."""
    name = Path(filename).name.removesuffix(".safetensors")
    if is_full_finetune(session.policy.transformer):
        folder = session.run_dir / "transformer" / name
        return [save_transformer(session, which, folder), folder]
    folder = session.run_dir / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file(lora_state_dict(session, which), path, metadata=metadata(session, which))
    return [path]

