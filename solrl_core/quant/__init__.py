"""NVFP4 quantization: format, W4A4 linear, model transform, backends, checkpoints."""
from .backends import BACKENDS, BackendChoice, select_backend, transformer_engine_available
from .checkpoint import load_quantized, quantized_state_dict, save_quantized
from .layers import Int8DynamicLinear, NVFP4Linear, QuantizedLayer, TELinear
from .model import (
    DEFAULT_SKIP,
    FAMILY_MIN_DIM,
    LayerReport,
    QuantConfig,
    QuantReport,
    quantize_model,
    quantized_layers,
    requantize_model,
)
from .nvfp4 import NVFP4Tensor, quantize

__all__ = [
    "BACKENDS", "BackendChoice", "DEFAULT_SKIP", "FAMILY_MIN_DIM", "Int8DynamicLinear", "LayerReport",
    "NVFP4Linear", "NVFP4Tensor", "QuantConfig", "QuantReport", "QuantizedLayer", "TELinear", "load_quantized",
    "quantize", "quantize_model", "quantized_layers", "quantized_state_dict", "requantize_model", "save_quantized",
    "select_backend", "transformer_engine_available",
]
