"""Policy adapters (SANA, FLUX.1, SD3/SD3.5, embedded tiny model), loading and LoRA."""
from .base import Conditioning, FlowPolicy, ModelNotFoundError, seeded_noise
from .loading import load_policy
from .lora import (
    adapter_state,
    adapters_disabled,
    add_lora,
    load_adapter_state,
    make_inference_copy,
    refresh_inference_copy,
    trainable_parameters,
    use_adapter,
)

__all__ = [
    "Conditioning",
    "FlowPolicy",
    "ModelNotFoundError",
    "adapter_state",
    "adapters_disabled",
    "add_lora",
    "load_adapter_state",
    "load_policy",
    "make_inference_copy",
    "refresh_inference_copy",
    "seeded_noise",
    "trainable_parameters",
    "use_adapter",
]
