"""quantize_model / requantize_model / checkpoints on tiny SANA, FLUX and SD3 transformers."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from solrl_core.quant import (
    NVFP4Linear,
    QuantConfig,
    load_quantized,
    quantize_model,
    quantized_layers,
    requantize_model,
    save_quantized,
)


def _sana():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=16, num_cross_attention_heads=2,
                                   cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
                                   in_channels=4, out_channels=4, sample_size=8, patch_size=1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 32),
                  timestep=torch.tensor([500.0]))
    return model, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6))
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3))
    return model, inputs


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([500.0]))
    return model, inputs


FAMILIES = {"sana": _sana, "flux": _flux, "sd3": _sd3}


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantize_model_keeps_output_close(family):
    model, inputs = FAMILIES[family]()
    model.eval()
    ref = _run(model, inputs)
    qmodel = copy.deepcopy(model)
    report = quantize_model(qmodel, QuantConfig.for_family(family, min_dim=16), backend="emulated")
    out = _run(qmodel, inputs)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"{family}: {report.summary()}; output rel. error {rel:.4f}")
    assert len(report.quantized) >= 8
    assert rel < 0.25
    names = {r.name for r in report.quantized}
    assert not any("embed" in n for n in names) and "proj_out" not in names
    assert all(0 < r.rel_error < 0.2 for r in report.quantized)
    assert report.bytes_after < report.bytes_before / 6
    assert report.skipped and all(isinstance(v, str) for v in report.skipped.values())
    json.dumps(report.to_dict())
    assert set(quantized_layers(qmodel)) == names
    if family == "sana":  # the feed-forward 1x1 convolutions are quantized as linears
        assert "transformer_blocks.0.ff.conv_inverted" in names


def test_min_dim_skip_and_include_rules():
    model, _ = _flux()
    config = QuantConfig.for_family("flux", min_dim=100, include=("context_embedder",))
    report = quantize_model(model, config, backend="emulated")
    names = {r.name for r in report.quantized}
    assert "context_embedder" in names  # include overrides skip pattern and min_dim
    assert "transformer_blocks.0.ff.net.0.proj" in names  # max(128, 32) > 100
    assert "transformer_blocks.0.attn.to_q" not in names
    assert "min_dim" in report.skipped["transformer_blocks.0.attn.to_q"]
    assert "skip pattern" in report.skipped["time_text_embed.timestep_embedder.linear_1"]
    assert "multiple of 16" in report.skipped["x_embedder"]  # 4 input channels: no 16-element block


def test_backend_none_and_cpu_int8():
    model, inputs = _sd3()
    ref = _run(model, inputs)
    auto = quantize_model(copy.deepcopy(model), QuantConfig(min_dim=16), backend="auto")
    assert auto.backend == "emulated" and "cpu" in auto.backend_reason and auto.quantized
    report = quantize_model(copy.deepcopy(model), QuantConfig(min_dim=16), backend="none")
    assert report.backend == "none" and not report.quantized and report.skipped
    qmodel = copy.deepcopy(model)
    report = quantize_model(qmodel, QuantConfig(min_dim=16), backend="cpu_int8")
    assert report.quantized and report.backend == "cpu_int8"
    assert ((_run(qmodel, inputs) - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cpu_bf16_casts_the_whole_copy(monkeypatch, family):
    from solrl_core.models.base import compute_dtype
    from solrl_core.quant import backends

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)  # the cast itself runs on any CPU
    model, inputs = FAMILIES[family]()
    ref = _run(model, inputs)
    qmodel = copy.deepcopy(model)
    report = quantize_model(qmodel, QuantConfig(min_dim=1 << 20), backend="cpu_bf16")  # min_dim does not apply
    assert report.backend == "cpu_bf16" and compute_dtype(qmodel, torch.float32) == torch.bfloat16
    assert {p.dtype for p in qmodel.parameters()} == {torch.bfloat16}
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert [r.name for r in report.quantized] == layers
    # bf16 keeps 8 significant bits: round to nearest errs by at most 2**-8 of each weight (unit roundoff).
    assert all(0 < r.rel_error <= 2**-8 and r.bytes_after * 2 == r.bytes_before for r in report.quantized)
    bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    out = _run(qmodel, bf16_inputs)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()).item() < 0.02
    requantize_model(qmodel, model)  # the full fine-tuning refresh: every weight copied, cast
    assert all(torch.equal(q, p.to(torch.bfloat16)) for q, p in zip(qmodel.parameters(), model.parameters()))


@pytest.mark.parametrize("as_state_dict", [False, True])
def test_requantize_equals_fresh_quantize(as_state_dict):
    model, inputs = _sana()
    config = QuantConfig(min_dim=16)
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, config)
    before = {n: id(m) for n, m in quantized_layers(qmodel).items()}
    with torch.no_grad():  # a training step changes the high-precision weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seconds = requantize_model(qmodel, model.state_dict() if as_state_dict else model)
    assert seconds > 0 and qmodel.solrl_quant_report.requantize_seconds == seconds
    assert {n: id(m) for n, m in quantized_layers(qmodel).items()} == before  # not rebuilt
    fresh = copy.deepcopy(model)
    quantize_model(fresh, config)
    fresh_layers = quantized_layers(fresh)
    for name, layer in quantized_layers(qmodel).items():
        other = fresh_layers[name]
        assert torch.equal(layer.weight, other.weight)
        assert torch.equal(layer.weight_scale.view(torch.uint8), other.weight_scale.view(torch.uint8))
        assert torch.equal(layer.weight_scale_2, other.weight_scale_2)
        assert (layer.bias is None and other.bias is None) or torch.equal(layer.bias, other.bias)
    assert torch.equal(_run(qmodel, inputs), _run(fresh, inputs))


def test_requantize_reports_missing_weights():
    model, _ = _sana()
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, QuantConfig.for_family("sana", min_dim=16))
    with pytest.raises(ValueError, match="transformer_blocks"):
        requantize_model(qmodel, {})


def test_checkpoint_round_trip_is_exact(tmp_path):
    from safetensors.torch import load_file

    model, inputs = _flux()
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, QuantConfig.for_family("flux", min_dim=16, weight_tile=(1, 16)))
    out = _run(qmodel, inputs)  # records activation amax -> input_scale
    path = tmp_path / "flux_nvfp4.safetensors"
    save_quantized(qmodel, path)
    state = load_file(str(path))
    name = "transformer_blocks.0.attn.to_q"
    assert state[f"{name}.weight"].dtype == torch.uint8 and state[f"{name}.weight"].shape == (32, 16)
    assert state[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn and state[f"{name}.weight_scale"].shape == (32, 2)
    assert state[f"{name}.weight_scale_2"].dtype == torch.float32 and state[f"{name}.weight_scale_2"].dim() == 0
    assert state[f"{name}.input_scale"].item() > 0

    other = copy.deepcopy(model)
    quantize_model(other, QuantConfig.for_family("flux", min_dim=16, weight_tile=(16, 16)))  # different tiles, so different bytes
    load_quantized(other, path)
    for n, layer in quantized_layers(other).items():
        src = quantized_layers(qmodel)[n]
        assert isinstance(layer, NVFP4Linear) and layer.tile == (1, 16)
        for attr in ("weight", "weight_scale_2", "weight_amax", "bias"):
            assert torch.equal(getattr(layer, attr), getattr(src, attr))
        assert torch.equal(layer.weight_scale.view(torch.uint8), src.weight_scale.view(torch.uint8))
    assert torch.equal(_run(other, inputs), out)


class _ChannelsFirstLinear(torch.nn.Linear):
    """Like a 1x1 conv written as a linear: applied over dim 1 of (B, C, H, W)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def test_linear_subclasses_with_own_forward():
    flagged, plain = _ChannelsFirstLinear(32, 48), _ChannelsFirstLinear(32, 48)
    flagged.channels_first = True
    model = torch.nn.ModuleDict({"flagged": flagged, "plain": plain})
    x = torch.randn(2, 32, 4, 4)
    ref = flagged(x)
    report = quantize_model(model, QuantConfig(min_dim=0))
    assert [r.name for r in report.quantized] == ["flagged"]
    assert "overrides nn.Linear.forward" in report.skipped["plain"]
    out = model["flagged"](x)
    assert out.shape == ref.shape and ((out - ref).norm() / ref.norm()).item() < 0.25


def test_load_merged_weight_hook_matches_refresh():
    lin = torch.nn.Linear(64, 32)
    a = NVFP4Linear(lin.weight, lin.bias, "a")
    b = NVFP4Linear(lin.weight, lin.bias, "b")
    new_weight = torch.randn(32, 64)
    a.load_merged_weight(new_weight)
    b.refresh(new_weight, lin.bias)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, lin.bias.detach())
