"""The explorer's layer choice per model family: the one definition (algorithm.md section 4).

The reference keeps a linear in high precision when its name contains one of the family's skip
substrings or when max(in, out) <= the family's threshold. Translated to diffusers' module names
(fnmatch globs over the full name; "*x*" is the reference's substring test), at the published
configs this quantizes:

- SD3.5-Large: 76 layers, each block's ff.net.0.proj and ff.net.2. The adaLN modulations (norm1,
  norm1_context) and the context stream's feed-forward (ff_context) stay high precision by name;
  the 2432-wide attention projections sit exactly on the threshold and stay high precision.
- FLUX.1-dev: 494 layers, every linear of the 19 double and 38 single blocks (the single blocks'
  proj_out, 15360 -> 3072, included). The reference quantizes 495: we keep the final output
  projection `proj_out` (3072 -> 64, 0.2 M parameters) in high precision, as in the other
  families, because its error lands on the predicted velocity unfiltered.
- SANA-1600M: 80 layers, the reference's native-layout choice in diffusers' layout: the 40
  feed-forward 1x1 convolutions (conv_inverted, conv_point) plus the cross-attention key and value
  projections attn2.to_k / attn2.to_v. Native SANA fuses those two into one 2240 -> 4480
  kv_linear (above the threshold); split, each is 2240 x 2240, so they are named in `include`.
  The self-attention q/k/v (native `attn.qkv`, skipped by name there) are skipped by name here.

The embedded tiny model is a SANA-family model of width 128: under the SANA preset only its
cross-attention to_k / to_v pass (by name); workflows for it lower `min_dim` (the quickstart uses 0)
to quantize its feed-forward and attention output / cross-attention layers as well.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExplorerPreset:
    family: str
    skip: tuple[str, ...]  # fnmatch globs over full module names: stay high precision
    include: tuple[str, ...]  # quantized whatever the threshold and skip globs say
    min_dim: int  # max(in, out) <= min_dim stays high precision


PRESETS: dict[str, ExplorerPreset] = {
    "sd3": ExplorerPreset(
        "sd3",
        skip=("*pos_embed*", "*context_embedder*", "*time_text_embed*", "*norm_out*", "*norm1*", "*ff_context*",
              "proj_out"),
        include=(),
        min_dim=2432,
    ),
    "flux": ExplorerPreset(
        "flux",
        skip=("*x_embedder*", "*context_embedder*", "*time_text_embed*", "*norm_out*", "proj_out"),
        include=(),
        min_dim=1000,
    ),
    "sana": ExplorerPreset(
        "sana",
        skip=("*patch_embed*", "*caption_projection*", "*time_embed*", "*norm_out*", "proj_out",
              "*attn1.to_q", "*attn1.to_k", "*attn1.to_v"),
        include=("*attn2.to_k", "*attn2.to_v"),
        min_dim=2240,
    ),
}


def preset_for(family: str) -> ExplorerPreset:
    key = family.lower()
    if key not in PRESETS:
        raise ValueError(f"no explorer preset for model family {family!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[key]
