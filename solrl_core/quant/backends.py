"""Which low-precision path runs the quantized linears on a given device.

auto: CUDA sm_100+ with Transformer Engine -> te_nvfp4; CUDA sm_89 / sm_90 with TE -> te_fp8;
other CUDA devices -> emulated; CPU -> emulated (the faithful NVFP4 reference). The CPU fast paths
are only used when asked for explicitly: cpu_int8 (int8 weights and activations in the chosen
linears) and cpu_bf16 (the whole copy in bf16, on CPUs with native bf16 arithmetic).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from ..runtime.extras import install_command

BACKENDS = ("emulated", "te_nvfp4", "te_fp8", "cpu_int8", "cpu_bf16", "none")
CPU_BACKENDS = ("cpu_int8", "cpu_bf16")
NVFP4_MIN_CAPABILITY = (10, 0)
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str


@functools.lru_cache(maxsize=1)
def import_transformer_engine() -> ModuleType | None:
    """transformer_engine.pytorch, or None. On CPU machines importing it raises RuntimeError, not ImportError."""
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None
    return te


def transformer_engine_available() -> bool:
    return import_transformer_engine() is not None


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:  # a private query of torch's oneDNN build; a build without it counts as "no"
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _capability(device: torch.device, capability: tuple[int, int] | None) -> tuple[int, int]:
    if capability is not None:
        return tuple(capability)
    return torch.cuda.get_device_capability(device)


def select_backend(requested: str = "auto", device: torch.device | str = "cpu",
                   capability: tuple[int, int] | None = None) -> BackendChoice:
    """Resolve "auto" (or check an explicit name) for `device`; `capability` overrides the CUDA query."""
    device = torch.device(device)
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"unknown quantization backend '{requested}' (choose from auto, {', '.join(BACKENDS)})")
    cuda = device.type == "cuda"
    cap = _capability(device, capability) if cuda else None
    te_ok = cuda and transformer_engine_available()
    if requested == "auto":
        if cuda and te_ok and cap >= NVFP4_MIN_CAPABILITY:
            return BackendChoice("te_nvfp4", f"CUDA sm_{cap[0]}{cap[1]} with Transformer Engine: native NVFP4")
        if cuda and te_ok and cap >= FP8_MIN_CAPABILITY:
            return BackendChoice("te_fp8", f"CUDA sm_{cap[0]}{cap[1]} has no NVFP4 tensor cores: FP8 via Transformer Engine")
        if cuda:
            why = "Transformer Engine not importable" if not te_ok else f"sm_{cap[0]}{cap[1]} has no FP8/FP4 tensor cores"
            return BackendChoice("emulated", f"CUDA: {why}; NVFP4 emulated")
        return BackendChoice("emulated", f"{device.type}: NVFP4 emulated (faithful reference; cpu_int8 / cpu_bf16 are the fast approximate options)")
    if requested in ("te_nvfp4", "te_fp8"):
        need = NVFP4_MIN_CAPABILITY if requested == "te_nvfp4" else FP8_MIN_CAPABILITY
        if not cuda:
            raise ValueError(f"backend '{requested}' needs a CUDA device, got {device}")
        if cap < need:
            raise ValueError(f"backend '{requested}' needs compute capability >= {need[0]}.{need[1]}, device has {cap[0]}.{cap[1]}")
        if not te_ok:
            raise ValueError(f"backend '{requested}' needs transformer_engine ({install_command('gpu')}), which does not import here")
        return BackendChoice(requested, f"requested; CUDA sm_{cap[0]}{cap[1]} with Transformer Engine")
    if requested in CPU_BACKENDS and device.type != "cpu":
        raise ValueError(f"backend '{requested}' runs on CPU only, got {device}")
    if requested == "cpu_bf16":
        if not cpu_has_native_bf16():
            raise ValueError("backend 'cpu_bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX); this one would "
                             "emulate it, slower than fp32: use cpu_int8")
        return BackendChoice(requested, "requested; CPU with native bf16: the whole explorer copy in bf16")
    return BackendChoice(requested, "requested")
