"""Save / load NVFP4 weights as safetensors with ModelOpt-style names.

Per quantized layer `<layer>`:
  <layer>.weight          uint8 (out, in/2), packed E2M1, element 2i in the low nibble
  <layer>.weight_scale    float8_e4m3fn (out, in/16), block scales (16x16 tiles repeated per row)
  <layer>.weight_scale_2  fp32 scalar, tensor decode scale = weight amax / 2688
  <layer>.input_scale     fp32 scalar, largest activation amax seen so far / 2688 (calibration record);
                          1.0 when no activation was seen. Our forward always uses a fresh dynamic amax.
  <layer>.bias            the high-precision bias, when the layer has one
  <layer>.weight_amax     fp32 scalar, the weight amax (the GEMM alpha needs it exactly; amax/2688 is rounded)
Weight tiles go in the file metadata ("tiles": JSON layer -> [rows, cols]). Round trip is exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import NVFP4Linear
from .model import quantized_layers
from .nvfp4 import NVFP4_RANGE, NVFP4Tensor

FORMAT = "nvfp4"


def _nvfp4_layers(model: nn.Module) -> dict[str, NVFP4Linear]:
    layers = quantized_layers(model)
    other = [n for n, m in layers.items() if not isinstance(m, NVFP4Linear)]
    if other:
        raise ValueError(f"NVFP4 checkpoints hold emulated-backend layers only; '{other[0]}' is {layers[other[0]].backend}")
    return layers


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, layer in _nvfp4_layers(model).items():
        seen = layer.input_amax.float()
        state[f"{name}.weight"] = layer.weight
        state[f"{name}.weight_scale"] = layer.weight_scale
        state[f"{name}.weight_scale_2"] = layer.weight_scale_2.float()
        state[f"{name}.weight_amax"] = layer.weight_amax.float()
        state[f"{name}.input_scale"] = seen / NVFP4_RANGE if seen > 0 else torch.ones(())
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_quantized(model: nn.Module, path: str | Path) -> None:
    tiles = {name: list(layer.tile) for name, layer in _nvfp4_layers(model).items()}
    save_file(quantized_state_dict(model), str(path), metadata={"format": FORMAT, "tiles": json.dumps(tiles)})


def load_quantized(model: nn.Module, path: str | Path) -> None:
    """Load weights saved by save_quantized into a model already transformed by quantize_model."""
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        tiles = json.loads((f.metadata() or {}).get("tiles", "{}"))
    for name, layer in _nvfp4_layers(model).items():
        if f"{name}.weight" not in state:
            raise ValueError(f"{path}: no quantized weights for layer '{name}'")
        device = layer.weight.device
        layer.tile = tuple(tiles.get(name, layer.tile))
        q = NVFP4Tensor(state[f"{name}.weight"], state[f"{name}.weight_scale"], state[f"{name}.weight_scale_2"],
                        state[f"{name}.weight_amax"], layer.tile).to(device)
        layer.set_quantized_weight(q)
        layer._store_bias(state.get(f"{name}.bias"))
        input_scale = state[f"{name}.input_scale"]
        layer.input_amax.copy_(input_scale * NVFP4_RANGE if input_scale != 1.0 else torch.zeros(()))
