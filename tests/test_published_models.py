"""The published configs shipped as data, built on the meta device: parameter counts against
platform.md, and the explorer's layers against the reference presets of algorithm.md section 4."""
from __future__ import annotations

import pytest
import torch

from solrl_core.models import ModelNotFoundError, load_policy
from solrl_core.models.loading import resolve_source
from solrl_core.models.published import (
    PUBLISHED,
    build_component,
    model_components,
    parameter_count,
    published_folder,
)
from solrl_core.quant import (
    Int8DynamicLinear,
    NVFP4Linear,
    QuantConfig,
    quantized_weight_nbytes,
    select_layers,
)
from solrl_core.quant.model import skip_reason

FAMILIES = ("sana", "flux", "sd3")


@pytest.fixture(scope="module")
def transformers_on_meta():
    return {fam: build_component(published_folder(fam), "transformer") for fam in FAMILIES}


def test_transformer_sizes_match_platform_facts(transformers_on_meta):
    # platform.md, "Real model sizes without weights": ~1.6 B, ~11.9 B, ~8.1 B parameters.
    expected = {"sana": 1.6e9, "flux": 11.9e9, "sd3": 8.1e9}
    for fam, model in transformers_on_meta.items():
        assert next(model.parameters()).device.type == "meta"
        assert parameter_count(model) == pytest.approx(expected[fam], rel=0.01), fam


def test_text_encoders_and_vaes_are_the_published_architectures():
    # Published sizes: Gemma-2-2B 2.61 B; T5-v1.1-XXL encoder 4.76 B; CLIP ViT-L/14 text tower 123 M
    # (123.7 M with SD3's text projection); OpenCLIP ViT-bigG text tower 695 M; the 16-channel KL VAE
    # of FLUX.1 / SD3.5 83.8 M; SANA's DC-AE f32c32 312 M.
    expected = {
        "sana": {"text_encoder": 2.61e9, "vae": 312e6},
        "flux": {"text_encoder": 123e6, "text_encoder_2": 4.76e9, "vae": 83.8e6},
        "sd3": {"text_encoder": 123.7e6, "text_encoder_2": 695e6, "text_encoder_3": 4.76e9, "vae": 83.8e6},
    }
    for fam, parts in expected.items():
        folder = published_folder(fam)
        assert set(model_components(folder)) == {"transformer", *parts}
        for name, count in parts.items():
            assert parameter_count(build_component(folder, name)) == pytest.approx(count, rel=0.005), (fam, name)


def _expected_layers(fam: str) -> list[str]:
    """Hand-written from algorithm.md section 4 and diffusers' module names."""
    if fam == "sd3":  # 38 blocks: the image stream's feed-forward only
        return [f"transformer_blocks.{i}.ff.{p}" for i in range(38) for p in ("net.0.proj", "net.2")]
    if fam == "sana":  # 20 blocks: feed-forward 1x1 convs + cross-attention key / value
        return [f"transformer_blocks.{i}.{p}" for i in range(20)
                for p in ("attn2.to_k", "attn2.to_v", "ff.conv_inverted", "ff.conv_point")]
    double = ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj",
              "attn.add_v_proj", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
              "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    single = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")
    return ([f"transformer_blocks.{i}.{p}" for i in range(19) for p in double]
            + [f"single_transformer_blocks.{i}.{p}" for i in range(38) for p in single])


@pytest.mark.parametrize("fam", FAMILIES)
def test_explorer_layers_are_the_reference_presets(fam, transformers_on_meta):
    chosen, skipped = select_layers(transformers_on_meta[fam], QuantConfig.for_family(fam))
    expected = _expected_layers(fam)
    assert len(chosen) == {"sd3": 76, "flux": 494, "sana": 80}[fam] == len(expected)
    assert sorted(chosen) == sorted(expected)
    if fam == "sd3":  # the reference's figure: 1.80 B quantized parameters
        assert sum(m.weight.numel() for m in chosen.values()) == pytest.approx(1.80e9, rel=0.005)
        assert skipped["transformer_blocks.0.norm1.linear"] == "matches a skip pattern"
        assert skipped["transformer_blocks.0.ff_context.net.0.proj"] == "matches a skip pattern"
        assert skipped["transformer_blocks.0.attn.to_q"] == "max(in, out) = 2432 <= min_dim 2432"
    if fam == "flux":  # 3072 -> 64 is above the threshold: the final projection is kept by name (494, not 495)
        assert skipped["proj_out"] == "matches a skip pattern"
        assert "single_transformer_blocks.37.proj_out" in chosen
    if fam == "sana":  # 2240 x 2240: on the threshold, quantized only because they are named
        assert skipped["transformer_blocks.0.attn2.to_q"] == "max(in, out) = 2240 <= min_dim 2240"
        assert skipped["transformer_blocks.0.attn1.to_q"] == "matches a skip pattern"


def test_threshold_is_inclusive_at_real_widths(transformers_on_meta):
    """max(in, out) == min_dim stays high precision; min_dim + 1 is quantized."""
    model = transformers_on_meta["sana"]
    layer = "transformer_blocks.3.attn1.to_out.0"  # 2240 x 2240
    at, _ = select_layers(model, QuantConfig.for_family("sana", min_dim=2240))
    below, _ = select_layers(model, QuantConfig.for_family("sana", min_dim=2239))
    assert layer not in at and layer in below
    assert len(below) - len(at) == 20 * 3  # attn1.to_out.0, attn2.to_q, attn2.to_out.0 in every block
    sd3 = transformers_on_meta["sd3"]
    assert "transformer_blocks.0.attn.to_q" in select_layers(sd3, QuantConfig.for_family("sd3", min_dim=2431))[0]


def test_threshold_boundary_on_one_layer():
    lin = torch.nn.Linear(32, 48, device="meta")
    assert skip_reason("x", lin, QuantConfig(min_dim=48)) == "max(in, out) = 48 <= min_dim 48"
    assert skip_reason("x", lin, QuantConfig(min_dim=47)) is None
    # include names a layer past the threshold and the skip globs, never past the format's shape rules
    odd = torch.nn.Linear(24, 48, device="meta")
    assert skip_reason("odd", odd, QuantConfig(include=("odd",))) == "in_features 24 is not a multiple of 16"
    assert skip_reason("x", lin, QuantConfig(min_dim=100, skip=("x",), include=("x",))) is None


def test_embedded_model_explorer_layers():
    """The embedded tiny model (SANA family, width 128): what its explorer quantizes."""
    model = load_policy("embedded").transformer
    preset, _ = select_layers(model, QuantConfig.for_family("sana"))
    assert sorted(preset) == sorted(f"transformer_blocks.{i}.attn2.{p}" for i in range(4) for p in ("to_k", "to_v"))
    quickstart, _ = select_layers(model, QuantConfig.for_family("sana", min_dim=0))  # the quickstart's setting
    per_block = ("attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.conv_inverted",
                 "ff.conv_point")
    assert sorted(quickstart) == sorted(f"transformer_blocks.{i}.{p}" for i in range(4) for p in per_block)


def test_quantized_weight_bytes_without_building():
    w, b = torch.randn(48, 64), torch.randn(48)
    assert quantized_weight_nbytes("emulated", 48, 64) == NVFP4Linear(w, b).weight_nbytes == 48 * 64 * 9 // 16 + 4
    cached = NVFP4Linear(w, b, cache_dequantized=True)
    extra = cached._weight_unscaled.numel() * cached._weight_unscaled.element_size()
    assert quantized_weight_nbytes("emulated", 48, 64, cache_dequantized=True) == cached.weight_nbytes + extra
    assert quantized_weight_nbytes("cpu_int8", 48, 64) == Int8DynamicLinear(w, b).weight_nbytes == 48 * 64 + 4 * 48
    assert quantized_weight_nbytes("te_fp8", 48, 64, source_element_size=2) == 2 * 48 * 64


@pytest.mark.parametrize("repo_id", sorted(PUBLISHED))
def test_config_only_folders_resolve_but_do_not_load(repo_id):
    folder = published_folder(repo_id)
    root, single = resolve_source(str(folder))
    assert root == folder and single is None
    with pytest.raises(ModelNotFoundError) as err:
        load_policy(str(folder))
    assert "configs only" in str(err.value) and "\n" not in str(err.value)


def test_layer_table_in_results_and_readme_is_current():
    """benchmarks/real_sizes.py generates the explorer layer table; the shipped copies must match it."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    table = runpy.run_path(str(root / "benchmarks" / "real_sizes.py"))["layer_table"]()
    results = (root / "benchmarks" / "results" / "real_sizes.md").read_text()
    readme = (root / "README.md").read_text()
    for line in table[2:]:
        assert line in results and line in readme, line
