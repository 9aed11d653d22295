"""Tiny SANA, FLUX.1 and SD3.5 pipelines built fully offline (small configs, tokenizers made in code).

Each `build_*` returns an in-memory diffusers pipeline with seeded random weights; `save_pipeline`
writes it as a diffusers folder and `write_hf_cache` lays a folder out as the Hugging Face hub cache
(models--org--name/snapshots/<rev> + refs/main) so it loads by repo id with HF_HUB_OFFLINE=1.
Other test modules import these helpers.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from solrl_core.models.slices import clip_tokenizer, gemma_tokenizer, t5_tokenizer


def _clip_text_config(vocab_size: int, hidden: int = 16, projection: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=24,
                          num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab_size, hidden_act="gelu",
                          projection_dim=projection, max_position_embeddings=77)


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=vocab_size,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config)


def _gemma_encoder(vocab_size: int, hidden: int = 16):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(head_dim=8, hidden_size=hidden, intermediate_size=32, num_attention_heads=2,
                          num_hidden_layers=1, num_key_value_heads=1, vocab_size=vocab_size,
                          max_position_embeddings=512, attn_implementation="eager")
    return Gemma2Model(config)


def _flow_scheduler(**kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kwargs)


def build_sana(seed: int = 0, with_vae: bool = True, in_channels: int = 4, sample_size: int = 8):
    """Tiny SanaPipeline. with_vae=False: pixel-space (latents are pixels, in_channels=3)."""
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = _gemma_encoder(len(tokenizer))
    channels = in_channels if with_vae else 3
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=channels, out_channels=channels, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=16, sample_size=sample_size)
    vae = None
    if with_vae:
        vae = AutoencoderDC(
            in_channels=3, latent_channels=in_channels, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407)
    # shift=1: the scheduler leaves given sigmas alone, as Sol-RL's SANA schedule (linspace, no shift).
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=_flow_scheduler(shift=1.0))


def build_flux(seed: int = 0, guidance_embeds: bool = True):
    """Tiny FluxPipeline (VAE factor 2, 4 latent channels packed into 16-channel tokens)."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), hidden=16, projection=16))
    text_encoder_2 = _t5_encoder(len(tokenizer_2), d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = _flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_sd3(seed: int = 0):
    """Tiny StableDiffusion3Pipeline (SD3.5 layout: CLIP-L, CLIP-G, T5; scheduler shift 3.0)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), hidden=16, projection=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer_2), hidden=16, projection=16))
    text_encoder_3 = _t5_encoder(len(tokenizer_3), d_model=32)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_flow_scheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)


BUILDERS = {"sana": build_sana, "flux": build_flux, "sd3": build_sd3}


def save_pipeline(pipe, path: Path) -> Path:
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def write_hf_cache(folder: Path, cache_dir: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Copy a diffusers folder into the hub cache layout; returns the snapshot folder."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot
