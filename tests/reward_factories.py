"""Tiny, offline reward models in the same architectures and file layouts as the real ones.

Other tests may import these: each builder writes files exactly where/how the real weights would sit
and returns what a test needs to compute the expected score independently.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# ---------------------------------------------------------------- HPSv2 (open_clip checkpoint file)
TINY_OPEN_CLIP = "solrl-tiny-hps"
_TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip(tmp: Path) -> str:
    """Register a tiny open_clip architecture (ViT + text transformer, real BPE tokenizer)."""
    import open_clip

    cfg = Path(tmp) / f"{TINY_OPEN_CLIP}.json"
    cfg.write_text(json.dumps(_TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(cfg)
    return TINY_OPEN_CLIP


def make_tiny_hps(root: Path, seed: int = 0):
    """Write `<root>/hpsv2/HPS_v2.1_compressed.pt` ({'state_dict': ...} as the real file) and return
    (arch, checkpoint path, in-memory model, preprocess)."""
    import open_clip

    arch = register_tiny_open_clip(root)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    with torch.no_grad():  # random, non-trivial weights so scores differ between images and prompts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = Path(root) / "hpsv2" / "HPS_v2.1_compressed.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return arch, path, model.eval(), preprocess


# ---------------------------------------------------------------- CLIP folders (PickScore, CLIPScore)
def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    pieces = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase + string.digits]
    vocab = {tok: i for i, tok in enumerate(specials + pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def make_tiny_clip_folder(folder: Path, seed: int = 0):
    """A CLIPModel + CLIPProcessor folder (config.json, weights, processor, tokenizer). Returns the model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16, logit_scale_init_value=2.6592,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


# ---------------------------------------------------------------- ImageReward (official key layout)
TINY_IR = {"image": 32, "patch": 8, "vis": 32, "vis_layers": 2, "vis_heads": 2,
           "txt": 32, "txt_layers": 2, "txt_heads": 2, "inter": 64, "max_pos": 40}
IR_HEAD = (1024, 128, 64, 16, 1)  # the official MLP head widths
IR_HEAD_INDICES = (0, 2, 4, 6, 7)  # Linear positions in mlp.layers (dropouts in between)
IR_WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "cat", "dog"]


def make_tiny_imagereward(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `<folder>/ImageReward.pt` (a flat state dict with the official key names) and `vocab.txt`.
    Returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    c = TINY_IR

    def rnd(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=g)

    def norm(prefix, d):
        return {f"{prefix}.weight": 1 + rnd(d, scale=0.1), f"{prefix}.bias": rnd(d, scale=0.1)}

    def lin(prefix, out_f, in_f):
        return {f"{prefix}.weight": rnd(out_f, in_f), f"{prefix}.bias": rnd(out_f, scale=0.05)}

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + IR_WORDS
    sd: dict[str, torch.Tensor] = {}
    v, n_pos = "blip.visual_encoder", (c["image"] // c["patch"]) ** 2 + 1
    sd[f"{v}.cls_token"] = rnd(1, 1, c["vis"])
    sd[f"{v}.pos_embed"] = rnd(1, n_pos, c["vis"])
    sd[f"{v}.patch_embed.proj.weight"] = rnd(c["vis"], 3, c["patch"], c["patch"], scale=0.05)
    sd[f"{v}.patch_embed.proj.bias"] = rnd(c["vis"], scale=0.05)
    for i in range(c["vis_layers"]):
        b = f"{v}.blocks.{i}"
        sd |= norm(f"{b}.norm1", c["vis"]) | norm(f"{b}.norm2", c["vis"])
        sd |= lin(f"{b}.attn.qkv", 3 * c["vis"], c["vis"]) | lin(f"{b}.attn.proj", c["vis"], c["vis"])
        sd |= lin(f"{b}.mlp.fc1", 4 * c["vis"], c["vis"]) | lin(f"{b}.mlp.fc2", c["vis"], 4 * c["vis"])
    sd |= norm(f"{v}.norm", c["vis"])
    t, h = "blip.text_encoder", c["txt"]
    sd[f"{t}.embeddings.word_embeddings.weight"] = rnd(len(vocab) + 2, h)  # +2: BLIP's [DEC] and [ENC]
    sd[f"{t}.embeddings.position_embeddings.weight"] = rnd(c["max_pos"], h)
    sd[f"{t}.embeddings.position_ids"] = torch.arange(c["max_pos"]).unsqueeze(0)
    sd |= norm(f"{t}.embeddings.LayerNorm", h)
    for i in range(c["txt_layers"]):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_in in (("attention", h), ("crossattention", c["vis"])):
            sd |= lin(f"{b}.{att}.self.query", h, h)
            sd |= lin(f"{b}.{att}.self.key", h, kv_in) | lin(f"{b}.{att}.self.value", h, kv_in)
            sd |= lin(f"{b}.{att}.output.dense", h, h) | norm(f"{b}.{att}.output.LayerNorm", h)
        sd |= lin(f"{b}.intermediate.dense", c["inter"], h) | lin(f"{b}.output.dense", h, c["inter"])
        sd |= norm(f"{b}.output.LayerNorm", h)
    sd |= lin("blip.vision_proj", 16, c["vis"]) | lin("blip.text_proj", 16, h)  # in the real file, unused
    widths = (h,) + IR_HEAD
    for idx, (i_f, o_f) in zip(IR_HEAD_INDICES, zip(widths[:-1], widths[1:])):
        sd |= lin(f"mlp.layers.{idx}", o_f, i_f)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return sd
