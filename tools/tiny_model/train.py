"""Train the embedded tiny model from scratch on drawn scenes (flow matching, CPU, minutes).

    python -m tools.tiny_model.train --out runs/tiny --threads 1

The defaults are the settings that produced the shipped weights (38 min on one core).

Transformer and text encoder train jointly: a frozen random encoder gives every word a fixed random
vector, but relations need the encoder to learn which colour/shape is the subject and which the
object, and the encoder costs under 3% of the compute. The exported weights are the EMA.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from solrl_core.scenes import KINDS

from .config import (
    PRESETS,
    TinyModelConfig,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
)
from .data import DEFAULT_KIND_WEIGHTS, SceneStream
from .flow import TinyModel, sample

MODEL_INDEX = {
    "_class_name": "SanaPipeline",
    "_diffusers_version": "0.42.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Gemma2Model"],
    "tokenizer": ["transformers", "GemmaTokenizer"],
    "transformer": ["diffusers", "SanaTransformer2DModel"],
    "vae": [None, None],  # pixel space: the "latent" is the RGB image in [-1, 1]
}
PREVIEW_PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a green circle",
                   "two purple squares", "three red circles", "a red circle left of a blue square",
                   "a green triangle above a yellow circle"]


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    preset: str = "default"
    steps: int = 4600
    minutes: float | None = None  # wall-time cap; stopping early is recorded in the log
    init: str | None = None  # continue from this exported folder (fresh optimizer, EMA from its weights)
    seed: int = 0
    batch_size: int = 48
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # Centre of the logit-normal sigma draw: above 0 spends more steps at high noise, where an object's
    # shape is decided (at low noise it is already visible in x_t).
    sigma_logit_mean: float = 0.5
    threads: int = 2
    log_every: int = 25
    save_every: int = 500  # 0: save only at the end
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))


@dataclass
class TrainResult:
    losses: list[float]
    steps_done: int
    seconds: float
    out: Path


def build_model(cfg: TinyModelConfig) -> TinyModel:
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(cfg.text_encoder, vocab_size=len(tokenizer))
    transformer = build_transformer(cfg.transformer, caption_channels=cfg.text_encoder.hidden_size)
    return TinyModel(transformer, text_encoder, tokenizer)


def save_model(model: TinyModel, out: Path) -> None:
    """Write a SANA-family diffusers folder without a VAE (fp32 safetensors)."""
    out.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    model.tokenizer.save_pretrained(out / "tokenizer")
    build_scheduler().save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def flow_matching_loss(model: TinyModel, prompts: list[str], x0: torch.Tensor, gen: torch.Generator,
                       sigma_logit_mean: float = 0.5) -> torch.Tensor:
    """MSE between predicted and true velocity (noise - x0) at logit-normal sigmas (as SD3)."""
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(len(x0), generator=gen) + sigma_logit_mean)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    emb, mask = model.encode(prompts)
    return (model.velocity(xt, sigma, emb, mask) - (noise - x0)).square().mean()


def save_preview(model: TinyModel, path: Path) -> None:
    from torchvision.utils import make_grid, save_image

    x = sample(model, PREVIEW_PROMPTS * 2, list(range(2 * len(PREVIEW_PROMPTS))), steps=10)
    grid = make_grid((x + 1) / 2, nrow=len(PREVIEW_PROMPTS), padding=1)
    save_image(nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0], path)


def train(cfg: TrainConfig) -> TrainResult:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    model_cfg = PRESETS[cfg.preset]
    earlier: dict = {}
    if cfg.init is not None:
        model = TinyModel.from_pretrained(cfg.init)
        info = Path(cfg.init) / "training.json"
        if info.is_file():
            earlier = json.loads(info.read_text())
            model_cfg = TinyModelConfig.from_dict(earlier["model"])
    else:
        model = build_model(model_cfg)
    params = [p for m in (model.transformer, model.text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    stream = iter(SceneStream(cfg.batch_size, seed=cfg.seed, kind_weights=cfg.kind_weights))
    losses: list[float] = []
    start = time.monotonic()
    step = 0

    def export() -> None:
        # Swap the EMA in, save, swap the live weights back.
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
            save_model(model, out)
            save_preview(model, out / "preview.png")
            for p, w in zip(params, live):
                p.copy_(w)
        minutes = (time.monotonic() - start) / 60
        tail = losses[-100:]
        summary = {"steps": step, "batch_size": cfg.batch_size, "minutes": round(minutes, 1),
                   "threads": cfg.threads, "seed": cfg.seed, "final_loss": round(sum(tail) / max(1, len(tail)), 4),
                   "config": _portable(asdict(cfg)), "model": model_cfg.to_dict()}
        if earlier:  # totals over the chain of runs this one continues
            summary["total_steps"] = earlier.get("total_steps", earlier["steps"]) + step
            summary["total_minutes"] = round(earlier.get("total_minutes", earlier["minutes"]) + minutes, 1)
            summary["init"] = {k: earlier[k] for k in ("steps", "minutes", "seed", "config") if k in earlier}
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "training_losses.json").write_text(json.dumps(losses) + "\n")

    model.transformer.train()
    model.text_encoder.train()
    while step < cfg.steps:
        if cfg.minutes is not None and time.monotonic() - start > 60 * cfg.minutes:
            print(f"time cap of {cfg.minutes} min reached at step {step}/{cfg.steps}", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        prompts, x0 = next(stream)
        loss = flow_matching_loss(model, prompts, x0, gen, cfg.sigma_logit_mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            print(f"step {step}/{cfg.steps} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.monotonic() - start:.0f}s", flush=True)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            export()
    model.transformer.eval()
    model.text_encoder.eval()
    export()
    return TrainResult(losses, step, time.monotonic() - start, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = TrainConfig()
    ap.add_argument("--out", default=d.out, help="output folder (a diffusers SANA folder without VAE)")
    ap.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this much wall time")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--init", default=None, help="continue training from an exported folder")
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--save-every", type=int, default=d.save_every)
    ap.add_argument("--sigma-logit-mean", type=float, default=d.sigma_logit_mean)
    ap.add_argument("--kind-weights", type=_kind_weights, default=d.kind_weights,
                    help="share of each scene kind, e.g. single=0.6,count=0.2,relation=0.2")
    a = ap.parse_args(argv)
    res = train(TrainConfig(out=a.out, preset=a.preset, steps=a.steps, minutes=a.minutes, seed=a.seed, init=a.init,
                            warmup_steps=a.warmup_steps,
                            batch_size=a.batch_size, lr=a.lr, threads=a.threads, save_every=a.save_every,
                            kind_weights=a.kind_weights, sigma_logit_mean=a.sigma_logit_mean))
    print(f"saved {res.out} after {res.steps_done} steps in {res.seconds / 60:.1f} min", flush=True)


def _kind_weights(text: str) -> dict[str, float]:
    """'single=0.6,count=0.2,relation=0.2' -> {'single': 0.6, ...} (argparse reports a bad value)."""
    out = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS or not weight:
            raise argparse.ArgumentTypeError(f"expected kind=weight with kind in {KINDS}, got {part!r}")
        out[kind.strip()] = float(weight)
    return out


def _portable(config: dict) -> dict:
    """The training settings without this machine's folders (only their names are kept)."""
    return {**config, **{k: Path(config[k]).name for k in ("out", "init") if config.get(k)}}


if __name__ == "__main__":
    main()
