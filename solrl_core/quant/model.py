"""Model transform: replace eligible linears by quantized layers, report, and refresh them in place."""
from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..models.base import COMPUTE_DTYPE_ATTRIBUTE
from .backends import select_backend
from .layers import QuantizedLayer, as_matrix, make_quantized_layer
from .presets import preset_for

REPORT_ATTRIBUTE = "solrl_quant_report"


@dataclass
class QuantConfig:
    """Which layers to quantize and how.

    Patterns are fnmatch globs matched against the full module name (e.g. "transformer_blocks.*.ff.*").
    A layer is quantized when it matches `include`, or else when it matches no `skip` pattern and
    max(in, out) > min_dim; in both cases its shape must suit the format (multiples of 16).
    `pointwise_convs` also quantizes 1x1 Conv2d (SANA's feed-forward). A model family's explorer
    is `QuantConfig.for_family(family)` (presets.py); the bare default quantizes every eligible layer.
    """

    skip: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    min_dim: int = 0
    weight_tile: tuple[int, int] = (16, 16)
    cache_dequantized: bool = False
    pointwise_convs: bool = True

    @classmethod
    def for_family(cls, family: str, min_dim: int | None = None, **overrides) -> QuantConfig:
        """The family's reference preset (skip / include globs, threshold); `min_dim` None keeps the
        preset's threshold, `overrides` replace other fields."""
        preset = preset_for(family)
        fields = {"skip": preset.skip, "include": preset.include,
                  "min_dim": preset.min_dim if min_dim is None else min_dim}
        return cls(**{**fields, **overrides})


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    rel_error: float  # ||W - dequant(quant(W))|| / ||W||
    bytes_before: int
    bytes_after: int


@dataclass
class QuantReport:
    backend: str
    backend_reason: str
    quantized: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason
    requantize_seconds: float | None = None

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.quantized)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.quantized)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after)
        return d

    def summary(self) -> str:
        worst = max(self.quantized, key=lambda r: r.rel_error, default=None)
        worst_txt = f", worst rel. weight error {worst.rel_error:.3f} ({worst.name})" if worst else ""
        done = (f"the whole copy in bf16 ({len(self.quantized)} linears / convolutions)" if self.backend == "cpu_bf16"
                else f"{len(self.quantized)} layers quantized, {len(self.skipped)} skipped")
        return (f"{self.backend}: {done}, weights {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} MiB"
                f"{worst_txt}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _candidate(module: nn.Module, config: QuantConfig) -> bool:
    if isinstance(module, QuantizedLayer):
        return False
    if isinstance(module, nn.Linear):
        return True  # subclasses with their own forward are screened in skip_reason
    return (config.pointwise_convs and isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.groups == 1 and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
            and module.dilation == (1, 1))


def _channels_first(module: nn.Module) -> bool:
    """1x1 Conv2d, or an nn.Linear subclass declaring `channels_first = True` (applied over dim 1 of B,C,H,W)."""
    return isinstance(module, nn.Conv2d) or bool(getattr(module, "channels_first", False))


def skip_reason(name: str, module: nn.Module, config: QuantConfig) -> str | None:
    """Why `module` stays high precision, or None when it gets quantized."""
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward \
            and not _channels_first(module):
        return f"{type(module).__name__} overrides nn.Linear.forward (set channels_first = True if it is a 1x1 conv)"
    w = as_matrix(module.weight)
    if w.shape[1] % 16:
        return f"in_features {w.shape[1]} is not a multiple of 16"
    if config.weight_tile == (16, 16) and w.shape[0] % 16:
        return f"out_features {w.shape[0]} is not a multiple of 16 (16x16 tiles)"
    if _matches(name, config.include):
        return None
    if _matches(name, config.skip):
        return "matches a skip pattern"
    if max(w.shape) <= config.min_dim:  # `<=`: a layer exactly at the threshold stays high precision
        return f"max(in, out) = {max(w.shape)} <= min_dim {config.min_dim}"
    return None


def select_layers(model: nn.Module, config: QuantConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(layers to quantize, {skipped layer: reason}) in module order; reads shapes only (meta models work)."""
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or not _candidate(module, config):
            continue
        reason = skip_reason(name, module, config)
        if reason is None:
            chosen[name] = module
        else:
            skipped[name] = reason
    return chosen, skipped


def quantized_weight_nbytes(backend: str, out_features: int, in_features: int, *, cache_dequantized: bool = False,
                            source_element_size: int = 2) -> int:
    """Bytes one quantized weight holds on its device, without building it (the memory plan uses this).

    emulated: NVFP4 (0.5 B per element + one E4M3 scale per 16 + 4 B tensor scale, nvfp4.md) plus
    the fp32 unscaled copy when `cache_dequantized`; te_*: Transformer Engine keeps the weight at the
    model's dtype (`source_element_size` bytes) and quantizes it per call; cpu_int8: int8 plus one
    fp32 scale per row.
    """
    n = out_features * in_features
    if backend == "emulated":
        return n // 2 + n // 16 + 4 + (4 * n if cache_dequantized else 0)
    if backend in ("te_nvfp4", "te_fp8"):
        return source_element_size * n
    if backend == "cpu_int8":
        return n + 4 * out_features
    raise ValueError(f"backend {backend!r} holds no quantized weights")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference = reference.float()
    norm = reference.norm().item()
    return (approx.float() - reference).norm().item() / norm if norm else 0.0


def quantize_model(model: nn.Module, config: QuantConfig | None = None, backend: str = "emulated") -> QuantReport:
    """Replace eligible linears of `model` in place; returns (and attaches to the model) a QuantReport.

    backend: "emulated", "te_nvfp4", "te_fp8", "cpu_int8", "cpu_bf16", "none" or "auto" (see
    select_backend). cpu_bf16 replaces no layer: it casts the whole copy (`config` does not apply).
    """
    config = config or QuantConfig()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    choice = select_backend(backend, device)
    report = QuantReport(choice.name, choice.reason)
    if choice.name == "cpu_bf16":
        return _cast_whole_copy(model, report, torch.bfloat16)
    chosen, report.skipped = select_layers(model, config)
    if choice.name == "none":
        report.skipped.update({name: "backend 'none'" for name in chosen})
        chosen = {}
    for name, module in chosen.items():
        layer = make_quantized_layer(choice.name, module, name, config.weight_tile, config.cache_dequantized,
                                     channels_first=_channels_first(module))
        weight = as_matrix(module.weight)
        report.quantized.append(LayerReport(
            name, layer.in_features, layer.out_features,
            _relative_error(weight, layer.dequantized_weight()),
            weight.numel() * weight.element_size(), layer.weight_nbytes))
        _set_submodule(model, name, layer)
    setattr(model, REPORT_ATTRIBUTE, report)
    return report


def _cast_whole_copy(model: nn.Module, report: QuantReport, dtype: torch.dtype) -> QuantReport:
    """Cast every floating parameter and buffer of `model` to `dtype` and mark the model so the policy
    feeds it `dtype` inputs; the report lists each linear / convolution with its rounding error."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = as_matrix(module.weight)
            report.quantized.append(LayerReport(
                name, weight.shape[1], weight.shape[0], _relative_error(weight, weight.to(dtype)),
                weight.numel() * weight.element_size(), weight.numel() * dtype.itemsize))
    # Tensor by tensor rather than model.to(): diffusers' to() warns on every cast; the modules a
    # diffusers model asks to keep in fp32 stay fp32, as its from_pretrained(torch_dtype=...) keeps them.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    setattr(model, COMPUTE_DTYPE_ATTRIBUTE, dtype)
    setattr(model, REPORT_ATTRIBUTE, report)
    return report


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def requantize_model(model: nn.Module, source: nn.Module | Mapping[str, torch.Tensor]) -> float:
    """Refresh every quantized layer from new high-precision weights; returns seconds taken.

    `source` is a module with the original (unquantized) structure or its state dict, with names
    like "blocks.0.attn.to_q.weight". Layers are updated in place, never rebuilt; parameters and
    buffers of the layers kept in high precision are copied from `source` as well.
    """
    start = time.perf_counter()
    state = source.state_dict() if isinstance(source, nn.Module) else source
    layers = quantized_layers(model)
    missing = [f"{n}.weight" for n in layers if f"{n}.weight" not in state]
    if missing:
        raise ValueError(f"requantize: source has no weight for {len(missing)} quantized layers, e.g. '{missing[0]}'")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.refresh(state[f"{name}.weight"], state.get(f"{name}.bias"))
        # The layers left in high precision (embedders, norms, ...) follow the source too.
        prefixes = tuple(f"{n}." for n in layers)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not name.startswith(prefixes) and name in state and state[name].shape == tensor.shape:
                tensor.copy_(state[name])
    seconds = time.perf_counter() - start
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if isinstance(report, QuantReport):
        report.requantize_seconds = seconds
    return seconds
