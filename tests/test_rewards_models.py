"""Neural rewards on tiny same-architecture models built offline: each score equals an independent
computation from the underlying model (or, for ImageReward, from the checkpoint tensors themselves)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reward_factories import TINY_IR, make_tiny_clip_folder, make_tiny_hps, make_tiny_imagereward

from solrl_core.rewards import load_reward
from solrl_core.rewards.images import to_pil

PROMPTS = ["a red circle", "a photo of a cat", "two blue squares", "a green dog"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g)
    x[1, :, 8:24, 8:24] = 0.9  # some structure so images differ beyond noise
    x[2] = x[2] * 0.3
    return x


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _assert_scores(scores: torch.Tensor, expected: torch.Tensor) -> None:
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (4,)
    torch.testing.assert_close(scores, expected.float(), atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-4  # the scorer discriminates between (image, prompt) pairs


# ------------------------------------------------------------------------------------------ HPSv2
@pytest.fixture(scope="module")
def tiny_hps(models_dir):
    return make_tiny_hps(models_dir)


def test_hpsv2_equals_open_clip_cosine(tiny_hps, models_dir, images):
    import open_clip

    arch, path, model, preprocess = tiny_hps
    reward = load_reward("hpsv2", path=str(path), arch=arch, batch_size=3)  # 2 batches: 3 + 1
    tok = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        px = torch.stack([preprocess(to_pil(im)) for im in images])
        img = F.normalize(model.encode_image(px), dim=-1)
        txt = F.normalize(model.encode_text(tok(PROMPTS)), dim=-1)
    expected = (img * txt).sum(-1)
    _assert_scores(reward(images, PROMPTS), expected)
    assert reward.required_files()[0].found == str(path)


def test_hpsv2_found_through_models_dir_and_reproducible(tiny_hps, models_dir, images, monkeypatch):
    arch = tiny_hps[0]
    monkeypatch.setenv("SOLRL_MODELS_DIR", str(models_dir))
    a = load_reward("hpsv2", arch=arch)(images, PROMPTS)
    b = load_reward("hpsv2", arch=arch)(images, PROMPTS)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


# -------------------------------------------------------------------------------- CLIP family
@pytest.fixture(scope="module")
def tiny_clip(models_dir):
    return make_tiny_clip_folder(models_dir / "pickscore")


def _clip_cosine(model, processor, images) -> torch.Tensor:
    pil = [to_pil(im) for im in images]
    with torch.no_grad():
        px = processor(images=pil, return_tensors="pt")["pixel_values"]
        txt = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        tx = model.text_projection(model.text_model(**txt).pooler_output)
    return (F.normalize(img, dim=-1) * F.normalize(tx, dim=-1)).sum(-1)


def test_pickscore_is_logit_scale_times_cosine(tiny_clip, models_dir, images):
    model, processor = tiny_clip
    expected = model.logit_scale.exp().detach() * _clip_cosine(model, processor, images)
    _assert_scores(load_reward("pickscore", search_dirs=[str(models_dir)])(images, PROMPTS), expected)


def test_clipscore_is_unscaled_cosine(tiny_clip, models_dir, images):
    model, processor = tiny_clip
    reward = load_reward("clipscore", path=str(models_dir / "pickscore"))
    scores = reward(images, PROMPTS)
    _assert_scores(scores, _clip_cosine(model, processor, images))
    assert scores.abs().max() <= 1.0
    # the same images as a list of PIL images give the same scores
    torch.testing.assert_close(reward([to_pil(im) for im in images], PROMPTS), scores)


# -------------------------------------------------------------------------------- ImageReward
@pytest.fixture(scope="module")
def tiny_ir(models_dir):
    return make_tiny_imagereward(models_dir / "imagereward")


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _lin(x, sd, prefix):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _attend(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    att = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        att = att.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def reference_imagereward(sd, pixels, ids, mask) -> torch.Tensor:
    """ImageReward written from the paper's architecture, straight from the official-layout tensors."""
    c, v, t = TINY_IR, "blip.visual_encoder", "blip.text_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=c["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}.cls_token"].expand(len(x), 1, -1), x], 1) + sd[f"{v}.pos_embed"]
    for i in range(c["vis_layers"]):
        b = f"{v}.blocks.{i}"
        q, k, val = _lin(_ln(x, sd, f"{b}.norm1", 1e-6), sd, f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attend(q, k, val, c["vis_heads"]), sd, f"{b}.attn.proj")
        h = _ln(x, sd, f"{b}.norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
    image = _ln(x, sd, f"{v}.norm", 1e-6)
    pos = sd[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = _ln(sd[f"{t}.embeddings.word_embeddings.weight"][ids] + pos, sd, f"{t}.embeddings.LayerNorm", 1e-12)
    for i in range(c["txt_layers"]):
        b = f"{t}.encoder.layer.{i}"
        for att, kv, m in (("attention", h, mask), ("crossattention", image, None)):
            p = f"{b}.{att}"
            ctx = _attend(_lin(h, sd, f"{p}.self.query"), _lin(kv, sd, f"{p}.self.key"),
                          _lin(kv, sd, f"{p}.self.value"), c["txt_heads"], m)
            h = _ln(_lin(ctx, sd, f"{p}.output.dense") + h, sd, f"{p}.output.LayerNorm", 1e-12)
        ff = _lin(F.gelu(_lin(h, sd, f"{b}.intermediate.dense")), sd, f"{b}.output.dense")
        h = _ln(ff + h, sd, f"{b}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # linear layers only: the official head has no activations
        r = _lin(r, sd, f"mlp.layers.{i}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_equals_reference_from_official_keys(tiny_ir, models_dir, images):
    from transformers import BertTokenizer

    sd = {k: v.float() for k, v in tiny_ir.items()}
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    px = torch.stack([torch.from_numpy(np.asarray(to_pil(im), dtype=np.float32) / 255).permute(2, 0, 1)
                      for im in images])
    tok = BertTokenizer(str(models_dir / "imagereward" / "vocab.txt"))(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = reference_imagereward(sd, (px - mean) / std, tok["input_ids"], tok["attention_mask"])
    reward = load_reward("imagereward", search_dirs=[str(models_dir)], vision_heads=2, text_heads=2)
    _assert_scores(reward(images, PROMPTS), expected)


def test_imagereward_found_by_explicit_file_path(tiny_ir, models_dir, images):
    by_path = load_reward("imagereward", path=str(models_dir / "imagereward" / "ImageReward.pt"),
                          vision_heads=2, text_heads=2)
    by_dir = load_reward("imagereward", path=str(models_dir / "imagereward"), vision_heads=2, text_heads=2)
    assert [f.found for f in by_path.required_files()] == [f.found for f in by_dir.required_files()]
    assert torch.equal(by_path(images[:2], PROMPTS[:2]), by_dir(images[:2], PROMPTS[:2]))


def test_imagereward_rejects_a_checkpoint_in_another_layout(tmp_path):
    from solrl_core.rewards.imagereward import load_imagereward

    sd = make_tiny_imagereward(tmp_path)
    sd["blip.visual_encoder.blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected BLIP visual encoder key"):
        load_imagereward(sd, 2, 2)


def test_pil_and_tensor_inputs_agree_for_uint8_images(tiny_hps, images):
    arch, path, _, _ = tiny_hps
    reward = load_reward("hpsv2", path=str(path), arch=arch)
    pil = [Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)) for i in range(2)]
    as_tensor = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1) for p in pil])
    assert torch.equal(reward(pil, PROMPTS[:2]), reward(as_tensor, PROMPTS[:2]))


def test_bf16_models_score_close_to_fp32_and_return_float32(tiny_hps, tiny_ir, models_dir, images):
    arch, path, _, _ = tiny_hps
    for name, kw in (("hpsv2", {"path": str(path), "arch": arch}),
                     ("imagereward", {"search_dirs": [str(models_dir)], "vision_heads": 2, "text_heads": 2})):
        full = load_reward(name, **kw)(images, PROMPTS)
        half = load_reward(name, dtype=torch.bfloat16, **kw)(images, PROMPTS)
        assert half.dtype == torch.float32
        scale = full.abs().max()
        assert (half - full).abs().max() < 0.1 * scale, name
