"""NVFP4 quantization: format, W4A4 linear, model transform, backends, checkpoints."""
from .backends import BACKENDS, BackendChoice, select_backend, transformer_engine_available
from .checkpoint import load_quantized, quantized_state_dict, save_quantized
from .layers import Int8DynamicLinear, NVFP4Linear, QuantizedLayer, TELinear
from .model import (
    LayerReport,
    QuantConfig,
    QuantReport,
    quantize_model,
    quantized_layers,
    quantized_weight_nbytes,
    requantize_model,
    select_layers,
)
from .nvfp4 import NVFP4Tensor, quantize
from .presets import PRESETS, ExplorerPreset, preset_for

__all__ = [
    "BACKENDS", "BackendChoice", "ExplorerPreset", "Int8DynamicLinear", "LayerReport", "NVFP4Linear", "NVFP4Tensor",
    "PRESETS", "QuantConfig", "QuantReport", "QuantizedLayer", "TELinear", "load_quantized", "preset_for", "quantize",
    "quantize_model", "quantized_layers", "quantized_state_dict", "quantized_weight_nbytes", "requantize_model",
    "save_quantized", "select_backend", "select_layers", "transformer_engine_available",
]
