"""ImageReward without the image-reward package (it does not import against transformers 5).

The official checkpoint (ImageReward.pt) is a BLIP ViT image encoder, a BERT text encoder that
cross-attends to the image, and an MLP head on the text [CLS] feature:
    score = (mlp(text_encoder(prompt, image_embeds)[:, 0]) - 0.16717362830052426) / 1.0333394966054072
Its keys (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) are mapped onto transformers'
BlipVisionModel / BlipTextModel; sizes are read from the checkpoint (ViT-L/16 + BERT-base for the real one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from .base import Reward
from .files import RequiredFile, find_required

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # the official scorer pads/truncates prompts to 35 BERT tokens
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_RENAMES = [  # official BLIP ViT name -> transformers BlipVisionModel name
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def vision_key(official: str) -> str:
    for pattern, repl in _VISION_RENAMES:
        new, n = re.subn(pattern, repl, official)
        if n:
            return new
    raise KeyError(f"unexpected BLIP visual encoder key {official!r}")


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


@dataclass(frozen=True)
class ImageRewardArch:
    """Sizes of an ImageReward checkpoint, read from its tensors (heads: 64 dims each unless given)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_positions: int

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], vision_heads: int | None = None,
                   text_heads: int | None = None) -> ImageRewardArch:
        v, t = _sub(state, "blip.visual_encoder."), _sub(state, "blip.text_encoder.")
        patch = v["patch_embed.proj.weight"].shape[-1]
        width = v["pos_embed"].shape[-1]
        grid = round((v["pos_embed"].shape[1] - 1) ** 0.5)
        vocab, text_width = t["embeddings.word_embeddings.weight"].shape
        return cls(
            image_size=grid * patch, patch_size=patch, vision_width=width,
            vision_layers=_count(v, r"blocks\.(\d+)\."), vision_heads=vision_heads or max(1, width // 64),
            vocab_size=vocab, text_width=text_width, text_layers=_count(t, r"encoder\.layer\.(\d+)\."),
            text_heads=text_heads or max(1, text_width // 64),
            text_intermediate=t["encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_positions=t["embeddings.position_embeddings.weight"].shape[0],
        )


def build_blip(arch: ImageRewardArch) -> tuple[nn.Module, nn.Module]:
    """Empty transformers BLIP vision and text encoders with an ImageReward checkpoint's sizes."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=arch.vision_width, intermediate_size=4 * arch.vision_width,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, hidden_act="gelu", layer_norm_eps=1e-6))
    # is_decoder=True only makes transformers build the cross-attention layers; we run it as an encoder
    text = BlipTextModel(BlipTextConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.text_width, encoder_hidden_size=arch.vision_width,
        intermediate_size=arch.text_intermediate, num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads, max_position_embeddings=arch.max_positions,
        hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    return vision, text


def build_head(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The MLP head as in the checkpoint: Linear layers at their indices (dropouts between, no activations)."""
    head = _sub(state, "mlp.layers.")
    idx = sorted({int(k.split(".")[0]) for k in head})
    layers: list[nn.Module] = [nn.Identity() for _ in range(idx[-1] + 1)]
    for i in idx:
        out_f, in_f = head[f"{i}.weight"].shape
        layers[i] = nn.Linear(in_f, out_f)
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict(head)
    return mlp


@dataclass
class ImageRewardModel:
    """The three parts of ImageReward and the image size its ViT was trained at."""

    vision: nn.Module
    text: nn.Module
    head: nn.Sequential
    image_size: int


def load_imagereward(state: dict[str, torch.Tensor], vision_heads: int | None = None,
                     text_heads: int | None = None) -> ImageRewardModel:
    """The model with every tensor of its three parts taken from an official-layout state dict."""
    arch = ImageRewardArch.from_state(state, vision_heads, text_heads)
    vision, text = build_blip(arch)
    vis_sd = {vision_key(k): v for k, v in _sub(state, "blip.visual_encoder.").items()}
    txt_sd = {k: v for k, v in _sub(state, "blip.text_encoder.").items() if not k.endswith("position_ids")}
    for module, sd, what in ((vision, vis_sd, "blip.visual_encoder"), (text, txt_sd, "blip.text_encoder")):
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"ImageReward checkpoint: {what} does not match the BLIP layout "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return ImageRewardModel(vision, text, build_head(state), arch.image_size)


class ImageRewardScorer(Reward):
    name = "imagereward"

    def __init__(self, *args, vision_heads: int | None = None, text_heads: int | None = None,
                 model: ImageRewardModel | None = None, tokenizer=None, **kwargs):
        """`vision_heads`/`text_heads`: attention heads when not 64 dims each (tiny test models).
        `model`/`tokenizer`: already built parts (then no file is needed)."""
        super().__init__(*args, **kwargs)
        self.vision_heads, self.text_heads = vision_heads, text_heads
        self._model, self._tokenizer = model, tokenizer
        self._given = model is not None and tokenizer is not None

    def modules(self) -> list[nn.Module]:
        m = self._model
        return [] if m is None else [m.vision, m.text, m.head]

    def required_files(self) -> list[RequiredFile]:
        if self._given:
            return []
        ckpt = find_required(self.name, ("ImageReward.pt",), "imagereward",
                             "download ImageReward.pt from the Hugging Face repo THUDM/ImageReward",
                             path=self.path, search_dirs=self.search_dirs)
        # the BERT vocabulary sits beside the checkpoint (or in bert-base-uncased/ there)
        near = None if self.path is None else Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent
        vocab = find_required(self.name, ("vocab.txt", "bert-base-uncased/vocab.txt"), "imagereward",
                              "download vocab.txt from the Hugging Face repo google-bert/bert-base-uncased",
                              path=near, search_dirs=self.search_dirs)
        return [ckpt, vocab]

    def _load(self) -> None:
        from transformers import BertTokenizer

        if not self._given:
            ckpt, vocab = (f.found for f in self.required_files())
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                    state = state[key]
            self._model = load_imagereward(state, self.vision_heads, self.text_heads)
            self._tokenizer = BertTokenizer(vocab)
        m = self._model
        m.vision, m.text, m.head = (x.to(self.device, self.dtype).eval() for x in (m.vision, m.text, m.head))
        self.preprocess = transforms.Compose([
            transforms.Resize(m.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(m.image_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        m = self._model
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        tok = self._tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                              return_tensors="pt")
        image_embeds = m.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = m.text(input_ids=tok["input_ids"].to(self.device),
                        attention_mask=tok["attention_mask"].to(self.device),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                        is_decoder=False).last_hidden_state
        raw = m.head(hidden[:, 0].to(self.dtype)).float().squeeze(-1)
        return (raw - SCORE_MEAN) / SCORE_STD
