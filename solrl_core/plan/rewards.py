"""The reward models' sizes, from their published architectures built on the meta device.

The reward classes load whatever checkpoint they are given; the plan sizes the published ones:
- pickscore: yuvalkirstain/PickScore_v1, a CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K config);
- clipscore: openai/clip-vit-large-patch14 (CLIP ViT-L/14);
- hpsv2: open_clip "ViT-H-14" with the HPS v2.1 checkpoint (rewards/hpsv2.py);
- imagereward: THUDM/ImageReward, BLIP ViT-L/16 at 224 px + BERT-base + an MLP head (rewards/imagereward.py).
Weight-free rewards (shapes, JPEG, OCR, which runs ONNX on the CPU) hold nothing on the accelerator.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .trace import trace_peak

META = torch.device("meta")
TEXT_TOKENS = {"pickscore": 77, "clipscore": 77, "hpsv2": 77, "imagereward": 35}


def _clip(vision: dict, text: dict, projection: int) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection)
    with torch.device(META):
        return CLIPModel(config)


def _pickscore(layers: int | None = None) -> nn.Module:
    return _clip(dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=layers or 32, num_attention_heads=16,
                      patch_size=14, image_size=224, hidden_act="gelu"),
                 dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers or 24,
                      num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", vocab_size=49408), 1024)


def _clipscore(layers: int | None = None) -> nn.Module:
    return _clip(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers or 24, num_attention_heads=16,
                      patch_size=14, image_size=224, hidden_act="quick_gelu"),
                 dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers or 12, num_attention_heads=12,
                      max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408), 768)


def _hpsv2(layers: int | None = None) -> nn.Module:
    import open_clip

    config = open_clip.get_model_config("ViT-H-14")
    if layers:
        config = {**config, "vision_cfg": {**config["vision_cfg"], "layers": layers},
                  "text_cfg": {**config["text_cfg"], "layers": layers}}
    with torch.device(META):
        return open_clip.CLIP(**config)


def _imagereward(layers: int | None = None) -> nn.Module:
    from ..rewards.imagereward import ImageRewardArch, build_blip

    arch = ImageRewardArch(image_size=224, patch_size=16, vision_width=1024, vision_layers=layers or 24,
                           vision_heads=16, vocab_size=30524, text_width=768, text_layers=layers or 12, text_heads=12,
                           text_intermediate=3072, max_positions=512)
    with torch.device(META):
        vision, text = build_blip(arch)
        head = nn.Sequential(nn.Linear(768, 1024), nn.Linear(1024, 128), nn.Linear(128, 64), nn.Linear(64, 16),
                             nn.Linear(16, 1))
    return nn.ModuleDict({"vision": vision, "text": text, "head": head})


def _clip_forward(model: nn.Module, batch: int, tokens: int):
    model.get_image_features(pixel_values=torch.empty(batch, 3, 224, 224, device=META, dtype=model.dtype))
    model.get_text_features(input_ids=torch.zeros(batch, tokens, dtype=torch.long, device=META))


def _open_clip_forward(model: nn.Module, batch: int, tokens: int):
    dtype = next(model.parameters()).dtype
    model.encode_image(torch.empty(batch, 3, 224, 224, device=META, dtype=dtype))
    model.encode_text(torch.zeros(batch, tokens, dtype=torch.long, device=META))


def _imagereward_forward(model: nn.Module, batch: int, tokens: int):
    dtype = next(model.parameters()).dtype
    image = model["vision"](pixel_values=torch.empty(batch, 3, 224, 224, device=META, dtype=dtype)).last_hidden_state
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=META)
    # (no masks: building them reads their values, which meta tensors do not have; they are tiny)
    hidden = model["text"](input_ids=ids, encoder_hidden_states=image, is_decoder=False).last_hidden_state
    model["head"](hidden[:, 0])


@dataclass(frozen=True)
class RewardArchitecture:
    build: Callable[[int | None], nn.Module]  # layers per tower (None: the published depth)
    forward: Callable[[nn.Module, int, int], None]


ARCHITECTURES = {
    "pickscore": RewardArchitecture(_pickscore, _clip_forward),
    "clipscore": RewardArchitecture(_clipscore, _clip_forward),
    "hpsv2": RewardArchitecture(_hpsv2, _open_clip_forward),
    "imagereward": RewardArchitecture(_imagereward, _imagereward_forward),
}


@dataclass(frozen=True)
class RewardSize:
    name: str
    parameters: int
    activation_bytes: int  # one scoring batch (image and text towers)


def reward_size(name: str, dtype: torch.dtype, batch: int) -> RewardSize:
    """Parameters and the activation peak of one scoring batch; zero for weight-free rewards.
    Scoring runs without gradient, so its peak sits inside one layer: one layer per tower is traced."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        return RewardSize(name, 0, 0)
    params = sum(p.numel() for p in arch.build(None).parameters())
    model = arch.build(1).to(dtype).eval()

    def score():
        with torch.no_grad():
            arch.forward(model, batch, TEXT_TOKENS[name])

    return RewardSize(name, params, trace_peak(score).peak)
