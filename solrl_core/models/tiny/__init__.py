"""The embedded tiny text-to-image flow model (see README.md in this folder)."""
from .config import (
           PRESETS,
           TinyModelConfig,
           build_scheduler,
           build_text_encoder,
           build_tokenizer,
           build_transformer,
)
from .flow import TinyModel, sample

__all__ = ["PRESETS", "TinyModel", "TinyModelConfig", "build_scheduler", "build_text_encoder",
           "build_tokenizer", "build_transformer", "sample"]
