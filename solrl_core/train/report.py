"""Pictures of a run: the kept samples of an iteration, and metric curves."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .samples import SampleBatch

LABEL_H = 12


def preview_grid(batch: SampleBatch, max_prompts: int = 4, scale: int = 4) -> Image.Image:
    """One row per prompt: its samples sorted best to worst, each labelled with its reward."""
    if batch.images is None:
        raise ValueError("these samples carry no images to preview")
    p = min(batch.shape[0], max_prompts)
    m = batch.shape[1]
    h, w = batch.images.shape[-2:]
    cell_w, cell_h = w * scale, h * scale + LABEL_H
    grid = Image.new("RGB", (cell_w * m, (cell_h + LABEL_H) * p), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(p):
        y0 = i * (cell_h + LABEL_H)
        draw.text((2, y0), batch.prompts[i][: cell_w * m // 6], fill=(0, 0, 0))
        rewards = batch.rewards[i]
        order = sorted(range(m), key=lambda j: -rewards[j].item() if math.isfinite(rewards[j].item()) else math.inf)
        for col, j in enumerate(order):
            arr = (batch.images[i, j].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (col * cell_w, y0 + LABEL_H))
            label = f"{rewards[j].item():.2f}"
            if batch.proxy_rewards is not None:
                label += f" ({batch.proxy_rewards[i, j].item():.2f})"
            draw.text((col * cell_w + 2, y0 + LABEL_H + h * scale), label, fill=(0, 0, 0))
    return grid


def metrics_plot(rows: list[dict[str, Any]], metric: str = "reward_mean", title: str | None = None) -> Image.Image:
    """Line plot of `metric` (and the draft rewards when plotting rewards) over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    series = [metric] + (["draft_reward_mean", "eval_reward_mean"] if metric == "reward_mean" else [])
    for key in series:
        pts = [(r["iteration"] + 1, r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label={"reward_mean": "regenerated (full precision)",
                                                     "draft_reward_mean": "drafts (low precision)",
                                                     "eval_reward_mean": "held-out (fixed prompts and seeds)",
                                                     }.get(key, key))
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
