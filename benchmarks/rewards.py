"""Reward scoring speed on CPU: images per second for each scorer at batch 16.

    python benchmarks/rewards.py [--quick] [--batch 16] [--threads 1] [--repeats 1] [--only hpsv2,ocr]

Full mode builds every neural reward at its real size with random weights (HPSv2: open_clip
ViT-H-14; PickScore: CLIP ViT-H/14; CLIPScore: CLIP ViT-L/14; ImageReward: BLIP ViT-L/16 + BERT-base
with cross-attention + MLP head), so the speed is the real one; --quick uses the tiny test models
loaded from files, as the real weights would be. Neural rewards get 512x512 images (their own
preprocessing resizes), OCR 512x512 images with drawn text, shapes 32x32 scenes. Writes
benchmarks/results/rewards.md (or --out).
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from reward_factories import (  # noqa: E402
    make_tiny_clip_folder,
    make_tiny_hps,
    make_tiny_imagereward,
    tiny_clip_tokenizer,
)

from solrl_core import scenes  # noqa: E402
from solrl_core.rewards import Reward, load_reward  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "cat", "dog"]


def _full_hpsv2() -> Reward:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
    return load_reward("hpsv2", model=model, preprocess=preprocess, arch="ViT-H-14")


def _full_clip(name: str, vision: tuple[int, int, int, int], text: tuple[int, int, int, int], proj: int) -> Reward:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer()  # a character-level stand-in: the real BPE files are not needed for speed
    (vw, vl, vh, vi), (tw, tl, th, ti) = vision, text
    cfg = CLIPConfig(
        vision_config={"hidden_size": vw, "num_hidden_layers": vl, "num_attention_heads": vh,
                       "intermediate_size": vi, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
        text_config={"hidden_size": tw, "num_hidden_layers": tl, "num_attention_heads": th, "intermediate_size": ti,
                     "vocab_size": len(tok), "max_position_embeddings": 77, "hidden_act": "gelu",
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=proj)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)
    return load_reward(name, model=CLIPModel(cfg), processor=processor)


def _full_imagereward(tmp: Path) -> Reward:
    from torch import nn
    from transformers import BertTokenizer

    from solrl_core.rewards.imagereward import ImageRewardArch, ImageRewardModel, build_blip

    arch = ImageRewardArch(image_size=224, patch_size=16, vision_width=1024, vision_layers=24, vision_heads=16,
                           vocab_size=30524, text_width=768, text_layers=12, text_heads=12,
                           text_intermediate=3072, max_positions=512)
    vision, text = build_blip(arch)
    head = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    (tmp / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return load_reward("imagereward", model=ImageRewardModel(vision, text, head, 224),
                       tokenizer=BertTokenizer(str(tmp / "vocab.txt")))


def builders(quick: bool, tmp: Path) -> dict[str, tuple[Callable[[], Reward], str]]:
    """name -> (build, what was built)."""
    if quick:
        def hps():
            arch, path, _, _ = make_tiny_hps(tmp)
            return load_reward("hpsv2", path=str(path), arch=arch)

        def clip_dir():
            if not (tmp / "pickscore" / "config.json").exists():
                make_tiny_clip_folder(tmp / "pickscore")
            return str(tmp / "pickscore")

        def ir():
            make_tiny_imagereward(tmp / "imagereward")
            return load_reward("imagereward", path=str(tmp / "imagereward"), vision_heads=2, text_heads=2)

        tiny = "tiny test model (random)"
        neural = {"hpsv2": (hps, tiny), "pickscore": (lambda: load_reward("pickscore", path=clip_dir()), tiny),
                  "clipscore": (lambda: load_reward("clipscore", path=clip_dir()), tiny), "imagereward": (ir, tiny)}
    else:
        neural = {
            "hpsv2": (_full_hpsv2, "open_clip ViT-H-14, random weights"),
            "pickscore": (lambda: _full_clip("pickscore", (1280, 32, 16, 5120), (1024, 24, 16, 4096), 1024),
                          "CLIP ViT-H/14, random weights"),
            "clipscore": (lambda: _full_clip("clipscore", (1024, 24, 16, 4096), (768, 12, 12, 3072), 768),
                          "CLIP ViT-L/14, random weights"),
            "imagereward": (lambda: _full_imagereward(tmp), "BLIP ViT-L/16 + BERT-base + MLP, random weights"),
        }
    rest = {
        "ocr": (lambda: load_reward("ocr"), "rapidocr-onnxruntime PP-OCRv4 (real weights)"),
        "shapes": (lambda: load_reward("shapes"), "rules, 32x32 scenes"),
        "jpeg_compressibility": (lambda: load_reward("jpeg_compressibility"), "JPEG q95"),
        "jpeg_incompressibility": (lambda: load_reward("jpeg_incompressibility"), "JPEG q95"),
    }
    return neural | rest


def inputs(name: str, n: int, size: int) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(0)
    if name == "shapes":
        pairs = [scenes.sample_scene(rng) for _ in range(n)]
        return [scenes.render(s) for _, s in pairs], [p for p, _ in pairs]
    g = torch.Generator().manual_seed(0)
    images, prompts = [], []
    for i in range(n):
        base = (torch.rand(3, size // 16, size // 16, generator=g) * 255).byte()
        img = Image.fromarray(base.permute(1, 2, 0).numpy()).resize((size, size), Image.BICUBIC)
        words = " ".join(rng.choice(WORDS) for _ in range(2))
        if name == "ocr":
            ImageDraw.Draw(img).rectangle((32, size // 2 - 40, size - 32, size // 2 + 40), fill=(240, 240, 235))
            ImageDraw.Draw(img).text((48, size // 2 - 24), words, fill=(10, 10, 10),
                                     font=ImageFont.load_default(size=48))
        images.append(img)
        prompts.append(f'a sign that says "{words}" number {i}')
    return images, prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny test models instead of full-size architectures")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--size", type=int, default=512, help="image side for all rewards but shapes")
    ap.add_argument("--only", default="", help="comma-separated reward names")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rewards.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = builders(a.quick, Path(tmp))
        names = [n.strip() for n in a.only.split(",") if n.strip()] or list(table)
        for name in names:
            build, what = table[name]
            t0 = time.perf_counter()
            reward = build()
            reward.batch_size = a.batch
            reward.load()
            built = time.perf_counter() - t0
            images, prompts = inputs(name, a.batch, a.size)
            reward(images[:2], prompts[:2])  # warm-up
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                scores = reward(images, prompts)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append((name, what, built, med, a.batch / med, float(scores.float().nanmean())))
            print(f"{name:24s} build {built:6.1f} s  batch {med:7.2f} s  {a.batch / med:8.2f} img/s", flush=True)
            del reward
            gc.collect()
    cmd = "python benchmarks/rewards.py" + (" --quick" if a.quick else "") + (
        f" --batch {a.batch} --threads {a.threads} --repeats {a.repeats}")
    lines = [
        "# Reward scoring speed (CPU)" + (" — quick mode, tiny models" if a.quick else ""),
        "",
        f"`{cmd}`: batch {a.batch}, fp32, {a.threads} CPU thread(s), images {a.size}x{a.size} (shapes: 32x32), "
        f"median of {a.repeats} timed batch(es) after a 2-image warm-up. "
        + ("Tiny test models loaded from files (a smoke check of the path, not real speeds). " if a.quick else
           "Full-size architectures with random weights: speed is the real models' speed; scores are meaningless. ")
        + "The machine's 2 cores were shared with other jobs while this ran: treat the numbers as rough.",
        "",
        "| reward | model | build + load (s) | s per batch | images / s |",
        "|---|---|---|---|---|",
    ] + [f"| {n} | {w} | {b:.1f} | {t:.2f} | {ips:.2f} |" for n, w, b, t, ips, _ in rows] + [""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
