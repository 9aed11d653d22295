"""The Transformer Engine explorer path on a CPU, through a stand-in with TE's calling convention.

Transformer Engine does not import without CUDA; the stand-in keeps what matters to our wrapper:
`te.Linear(in, out, bias=, params_dtype=, device=)` and a forward that flattens its input with
`view(-1, in_features)` (as TE's linear does), under `te.autocast(enabled=, recipe=)`.
"""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel  # imported before the stand-in exists (peft probes for TE)
from torch import nn

import solrl_core.quant.layers as layers_mod
from solrl_core.quant import QuantConfig, select_layers
from solrl_core.quant.layers import TELinear, make_quantized_layer


class _StandInTELinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=params_dtype, device=device)) if bias else None

    def forward(self, inp):
        flat = inp.view(-1, self.in_features)  # TE's reshape: fails on non-contiguous input
        return F.linear(flat, self.weight, self.bias).view(*inp.shape[:-1], self.out_features)


@pytest.fixture
def stand_in_te(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def autocast(enabled=True, recipe=None):
        calls.append(recipe)
        yield

    te = types.SimpleNamespace(Linear=_StandInTELinear, autocast=autocast)
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.NVFP4BlockScaling = lambda **kw: ("nvfp4", kw)
    recipe.Float8CurrentScaling = lambda: ("fp8", {})
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe
    package = types.ModuleType("transformer_engine")
    package.common = common
    for name, module in (("transformer_engine", package), ("transformer_engine.common", common),
                         ("transformer_engine.common.recipe", recipe)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(layers_mod, "import_transformer_engine", lambda: te)
    return calls


@pytest.mark.parametrize("backend", ["te_fp8", "te_nvfp4"])
def test_pointwise_conv_reaches_te_contiguous(stand_in_te, backend):
    conv = nn.Conv2d(64, 48, 1)
    x = torch.randn(2, 64, 5, 7)
    layer = make_quantized_layer(backend, conv, "ff.conv_inverted", (16, 16), False, channels_first=True)
    assert isinstance(layer, TELinear) and layer.pointwise_conv
    out = layer(x)
    assert out.shape == (2, 48, 5, 7)
    assert torch.allclose(out, conv(x), atol=1e-5)  # the stand-in does not quantize: same numbers
    assert stand_in_te and stand_in_te[-1][0] == ("nvfp4" if backend == "te_nvfp4" else "fp8")
    if backend == "te_nvfp4":  # inference drafting: no Hadamard transform, no stochastic rounding
        assert stand_in_te[-1][1] == {"disable_rht": True, "disable_stochastic_rounding": True,
                                      "disable_2d_quantization": False}


def test_sana_block_through_te_stand_ins(stand_in_te):
    """A SANA transformer whose feed-forward 1x1 convs run through TE equals the original."""
    model = SanaTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=32,
                                   num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                                   caption_channels=32, in_channels=4, out_channels=4, sample_size=8,
                                   patch_size=1).eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 6, 32),
                  timestep=torch.tensor([500.0, 200.0]), return_dict=False)
    with torch.no_grad():
        ref = model(**inputs)[0]
        chosen, _ = select_layers(model, QuantConfig.for_family("sana", min_dim=64))
        assert sorted(n.split(".", 2)[-1] for n in chosen) == ["attn2.to_k", "attn2.to_v", "ff.conv_inverted",
                                                                "ff.conv_point"]
        for name, module in chosen.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    make_quantized_layer("te_fp8", module, name, (16, 16), False,
                                         channels_first=isinstance(module, nn.Conv2d)))
        out = model(**inputs)[0]
    assert torch.allclose(out, ref, atol=1e-5)
