"""Real-width slices: a published transformer at its real widths and heads but one or two blocks.

Random weights, built offline in seconds: the transformer from the shipped published config with
fewer blocks, text encoders of one small layer that emit the real conditioning widths (hidden and
pooled sizes read from the published text-encoder configs), a two-level VAE with the real latent
channels, tokenizers made in code (character-level, no vocabulary file). The shapes, thresholds and
GEMM sizes of every transformer layer are the real model's, so the explorer quantizes the same
kinds of layers and the CPU pays the real per-layer costs, at a small resolution.
"""
from __future__ import annotations

import string

import torch

from .base import FlowPolicy
from .loading import policy_from_components
from .published import build_component, build_scheduler, component_config, pipeline_index, published_folder

# Blocks kept per family (FLUX.1: one double-stream and one single-stream block; SD3.5: its last
# block is a context-pre-only one, so two blocks keep both kinds).
SLICE_DEPTH = {"sana": {"num_layers": 1}, "flux": {"num_layers": 1, "num_single_layers": 1},
               "sd3": {"num_layers": 2}}
# The cheapest slice of each family: one block (FLUX.1: single-stream, 38 of its 57 blocks; SD3.5:
# its last, context-pre-only kind, which quantizes the same feed-forward layers as the others).
ONE_BLOCK = {"sana": {"num_layers": 1}, "flux": {"num_layers": 0, "num_single_layers": 1}, "sd3": {"num_layers": 1}}

# Character-level vocabularies: every prompt made of lowercase words, digits and basic punctuation
# tokenizes without unknown tokens, so tokenizers need no merges or trained models.
_CHARS = string.ascii_lowercase + string.digits + ",.'-:;!?()"


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    pieces = specials + ["▁"] + list(_CHARS) + [f"▁{c}" for c in _CHARS]
    return GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[])


def t5_tokenizer(extra_ids: int = 4):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [(f"▁{c}", -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    pieces = specials + list(_CHARS) + [f"{c}</w>" for c in _CHARS]
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=77)


_TOKENIZERS = {"GemmaTokenizerFast": gemma_tokenizer, "GemmaTokenizer": gemma_tokenizer,
               "T5TokenizerFast": t5_tokenizer, "T5Tokenizer": t5_tokenizer, "CLIPTokenizer": clip_tokenizer}

# One small layer, real output widths: the keys that set width (hidden_size, d_model, projection_dim)
# are kept from the published config, the others shrink.
_SMALL_TEXT = {
    "clip_text_model": dict(num_hidden_layers=1, intermediate_size=32, num_attention_heads=2),
    "t5": dict(num_layers=1, num_decoder_layers=1, d_ff=32, d_kv=8, num_heads=2, relative_attention_num_buckets=8),
    "gemma2": dict(num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, head_dim=16,
                   num_key_value_heads=1, attn_implementation="eager"),
}


def small_vae(family_folder, latent_channels: int):
    """Two levels (spatial factor 2), the published latent channels and scaling constants."""
    from diffusers import AutoencoderDC, AutoencoderKL

    published = component_config(family_folder, "vae")
    if published["_class_name"] == "AutoencoderDC":
        return AutoencoderDC(
            in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
            encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=published["scaling_factor"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 16),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=published["scaling_factor"],
                         shift_factor=published.get("shift_factor"))


def slice_components(family: str, *, depth: dict[str, int] | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Pipeline components of a random-weight real-width slice (see build_slice).

    depth: transformer config overrides (default SLICE_DEPTH[family]; the published values give
    the full-size transformer; width keys shrink it, for dry runs).
    """
    import transformers

    folder = published_folder(family)
    torch.manual_seed(seed)
    components = {"transformer": build_component(folder, "transformer", device, dtype,
                                                 **(SLICE_DEPTH[family] if depth is None else depth))}
    components["transformer"].requires_grad_(True)  # as a loaded model's
    model_index = pipeline_index(folder)
    for name, (_, class_name) in model_index.items():
        if name.startswith("tokenizer"):
            components[name] = _TOKENIZERS[class_name]()
    for name, (_, class_name) in model_index.items():
        if name.startswith("text_encoder"):
            config = component_config(folder, name)
            tokenizer = components[name.replace("text_encoder", "tokenizer")]
            small = {k: v for k, v in config.items() if k != "layer_types"}  # per-layer lists follow the depth
            small.update(_SMALL_TEXT[config["model_type"]], vocab_size=len(tokenizer))
            hf_config = transformers.AutoConfig.for_model(**small)
            components[name] = getattr(transformers, class_name)._from_config(hf_config).to(device, dtype)
    components["scheduler"] = build_scheduler(folder)
    latent_channels = component_config(folder, "vae")["latent_channels"]
    components["vae"] = small_vae(folder, latent_channels).to(device, dtype)
    return components


def build_slice(family: str, *, depth: dict[str, int] | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0, max_sequence_length: int = 8,
                **settings) -> FlowPolicy:
    """A random-weight real-width slice of the family's published model as a ready policy.

    depth: transformer config overrides (default SLICE_DEPTH[family]). settings: adapter options
    (e.g. resolution=(32, 32)).
    """
    components = slice_components(family, depth=depth, device=device, dtype=dtype, seed=seed)
    settings.setdefault("max_sequence_length", max_sequence_length)
    if family == "sana":
        settings.setdefault("complex_human_instruction", ())
    return policy_from_components(family, components, device, dtype, f"slice of {published_folder(family).name}",
                                  **settings)
