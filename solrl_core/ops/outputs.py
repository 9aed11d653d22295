"""Output nodes: Preview (best / worst grid), Plot Metrics (reward curve), Save LoRA."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..runtime import distributed as dp
from ..runtime.context import current_context
from ..runtime.metrics import metrics_log
from ..train.report import metrics_plot, preview_grid
from .registry import register
from .spec import Input, OpSpec, Output
from .training import CAT, SAMPLES, SESSION


def to_comfy_image(img: Image.Image) -> torch.Tensor:
    """ComfyUI's IMAGE: float [B, H, W, C] in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _ui(img: Image.Image, path) -> dict:
    """The saved file's path, and the image itself where the host can show it (ComfyUI)."""
    shown = current_context().show_image(img, path.name)
    return {"text": [str(path)], **({"images": [shown]} if shown else {})}


def preview_op(samples, max_prompts: int = 4, scale: int = 4) -> dict:
    session = samples.session
    if not dp.is_main() or not samples.prompts:  # files are written by process 0; nothing when the run is done
        return {"result": (samples, torch.zeros(1, 1, 1, 3))}
    grid = preview_grid(samples, max_prompts=max_prompts, scale=scale)
    path = session.run_dir / "previews" / f"iter-{session.iteration:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    metrics_log(session.run_dir).image("previews", grid, session.iteration)
    return {"ui": _ui(grid, path), "result": (samples, to_comfy_image(grid))}


register(OpSpec(
    id="SolRLPreview", display_name="Preview Samples", category=CAT,
    description="A grid of each prompt's kept samples, best to worst, with their rewards (and proxy "
                "rewards). Written to the run's previews/ folder; samples pass through unchanged so the "
                "node can sit inside the loop.",
    inputs=(
        Input("samples", SAMPLES),
        Input("max_prompts", "INT", 4, min=1, max=64),
        Input("scale", "INT", 4, min=1, max=16, tooltip="Pixel upscale for small images."),
    ),
    outputs=(Output("samples", SAMPLES), Output("image", "IMAGE")),
    function=preview_op,
    output_node=True,
    always_run=True,
))


def plot_metrics_op(session, metric: str = "reward_mean") -> dict:
    if not dp.is_main():
        return {"result": (torch.zeros(1, 1, 1, 3),)}
    img = metrics_plot(session.metrics, metric)
    path = session.run_dir / f"{metric}.png"
    img.save(path)
    return {"ui": _ui(img, path), "result": (to_comfy_image(img),)}


register(OpSpec(
    id="SolRLPlotMetrics", display_name="Plot Metrics", category=CAT,
    description="Plots a metric of the run over iterations (regenerated and draft rewards by default) "
                "and writes it next to the run's metrics.",
    inputs=(
        Input("session", SESSION),
        Input("metric", "STRING", "reward_mean", optional=True),
    ),
    outputs=(Output("image", "IMAGE"),),
    function=plot_metrics_op,
    output_node=True,
    always_run=True,
))


def save_lora_op(session, weights: str = "ema", filename: str = "sol_rl_lora") -> dict:
    from ..train.export import save_lora

    if not dp.is_main():
        return {"result": (session, "")}
    paths = save_lora(session, weights, filename)
    current_context().status("saved " + ", ".join(str(p) for p in paths))
    return {"ui": {"text": [str(p) for p in paths]}, "result": (session, str(paths[0]))}


register(OpSpec(
    id="SolRLSaveLoRA", display_name="Save LoRA", category=CAT,
    description="Saves the trained adapter (EMA by default, as used for evaluation) as safetensors: "
                "diffusers / peft format (load_lora_weights) and ComfyUI's LoRA-loader format, with the "
                "base model, iteration and rewards in the metadata.",
    inputs=(
        Input("session", SESSION),
        Input("weights", "COMBO", "ema", choices=("ema", "default", "old")),
        Input("filename", "STRING", "sol_rl_lora"),
    ),
    outputs=(Output("session", SESSION), Output("path", "STRING")),
    function=save_lora_op,
    output_node=True,
    always_run=True,
))

