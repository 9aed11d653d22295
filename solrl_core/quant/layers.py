"""Quantized replacements for nn.Linear (and 1x1 nn.Conv2d, which is a linear over channels).

All layers are inference-only (they run under no_grad): they serve the low-precision explorer,
while training uses the high-precision model.
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4
from .backends import import_transformer_engine
from .nvfp4 import E4M3_MAX, NVFP4_RANGE, NVFP4Tensor, quantize, quantize_dequantize_unscaled, scratch

# alpha = amax_A * amax_B / (6 * 6 * 448 * 448) rescales a GEMM of unscaled (e2m1 * e4m3) operands.
GEMM_ALPHA_DIVISOR = NVFP4_RANGE * NVFP4_RANGE


class QuantizedLayer(nn.Module):
    """Common interface: refresh from new weights, report error and bytes, 1x1-conv handling."""

    backend: str = ""

    def __init__(self, in_features: int, out_features: int, name: str, pointwise_conv: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.name = name
        self.pointwise_conv = pointwise_conv  # input (B, C, H, W) instead of (..., C)

    def refresh(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        raise NotImplementedError

    def current_bias(self) -> torch.Tensor | None:
        raise NotImplementedError

    def load_merged_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize from a new full-precision weight, keeping the bias (the LoRA-merge refresh hook)."""
        self.refresh(weight, self.current_bias())

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer effectively multiplies by, fp32 (out, in)."""
        raise NotImplementedError

    @property
    def weight_nbytes(self) -> int:
        raise NotImplementedError

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.pointwise_conv:
                return self.linear(x.movedim(1, -1)).movedim(-1, 1)
            return self.linear(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend}"

    def _store_bias(self, bias: torch.Tensor | None) -> None:
        current = self._buffers.get("bias")
        if bias is not None and current is not None and current.shape == bias.shape:
            current.copy_(bias.detach())  # in place: refresh keeps device and identity
        else:
            self.register_buffer("bias", None if bias is None else bias.detach().clone())


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) view of a Linear weight or a 1x1 Conv2d weight (out, in, 1, 1)."""
    return weight.detach().reshape(weight.shape[0], -1)


class _LastActivation(threading.local):
    """The activation path of NVFP4Linear: quantize and dequantize in one fused pass (bit-identical to
    quantize(...).dequantize_unscaled()) into a per-thread scratch buffer that the GEMM reads.

    Attention projections receive one tensor several times in a row (to_q, to_k, to_v of the same
    hidden states; to_k, to_v of the same text states): on CPU, a call with the very tensor the
    previous call on this thread quantized, unchanged, reuses its result. "Unchanged" is checked with
    the version counter that in-place ops bump (grad and no_grad mode). Inference-mode tensors have
    none, so an in-place write could go unseen: they are always quantized afresh.
    """

    source: torch.Tensor | None = None
    key: tuple = ()
    values: torch.Tensor | None = None
    amax: torch.Tensor | None = None

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return x.data_ptr(), x.shape, x.stride(), x.dtype, x._version

    def quantize(self, x: torch.Tensor, rows: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type != "cpu" or x.is_inference():
            return quantize_dequantize_unscaled(rows, name=name)
        key = self._key(x)
        if self.source is x and self.key == key:
            return self.values, self.amax
        self.source = self.values = None  # the scratch buffer is about to be overwritten
        values, amax = quantize_dequantize_unscaled(
            rows, scratch("activation", rows.numel(), torch.float32, x.device), name=name)
        if 4 * values.numel() <= nvfp4.SCRATCH_KEEP_BYTES:  # never hold on to a large one-off buffer
            self.source, self.key, self.values, self.amax = x, key, values, amax
        return values, amax


_LAST_ACTIVATION = _LastActivation()


class NVFP4Linear(QuantizedLayer):
    """Emulated W4A4 NVFP4 linear: the numerical reference on every device.

    Weight: NVFP4 with `tile` blocks (stored packed). Activation: quantized on every call with a fresh
    amax, 1x16 blocks along K. Output = (unscaled A) @ (unscaled W)^T in fp32 * alpha, + bias in fp32,
    cast to the input dtype; the operands are bit-exact, the GEMM exact up to accumulation order (on
    CPU alpha and bias are applied inside the GEMM call). `cache_dequantized` keeps the unscaled fp32
    weight (exact, 8x the memory; what the explorer uses).
    """

    backend = "emulated"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "",
                 tile: tuple[int, int] = (1, 16), cache_dequantized: bool = False, pointwise_conv: bool = False):
        w = as_matrix(weight)
        super().__init__(w.shape[1], w.shape[0], name, pointwise_conv)
        self.tile = tuple(tile)
        self.cache_dequantized = cache_dequantized
        self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32, device=w.device))
        self.refresh(weight, bias)

    def refresh(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        q = quantize(as_matrix(weight), self.tile, name=self.name)
        self.set_quantized_weight(q)
        self._store_bias(bias)

    def current_bias(self) -> torch.Tensor | None:
        return self.bias

    def set_quantized_weight(self, q: NVFP4Tensor) -> None:
        """Install an already-quantized weight (requantize and checkpoint loading use this)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: quantized weight shape {tuple(q.shape)} does not match "
                             f"({self.out_features}, {self.in_features})")
        # Buffer names follow ModelOpt's checkpoint layout.
        self.register_buffer("weight", q.packed)
        self.register_buffer("weight_scale", q.block_scales)
        self.register_buffer("weight_scale_2", q.tensor_scale.reshape(()))
        self.register_buffer("weight_amax", q.amax.reshape(()))
        cached = q.dequantize_unscaled() if self.cache_dequantized else None
        self.register_buffer("_weight_unscaled", cached, persistent=False)  # moves with .to(), not saved

    def nvfp4_weight(self) -> NVFP4Tensor:
        return NVFP4Tensor(self.weight, self.weight_scale, self.weight_scale_2, self.weight_amax, self.tile)

    def dequantized_weight(self) -> torch.Tensor:
        return self.nvfp4_weight().dequantize()

    @property
    def weight_nbytes(self) -> int:
        return self.nvfp4_weight().nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        a, amax = _LAST_ACTIVATION.quantize(x, rows, self.name)
        torch.maximum(self.input_amax, amax, out=self.input_amax)
        w = self._weight_unscaled
        if w is None:
            w = self.nvfp4_weight().dequantize_unscaled()
        alpha = amax * self.weight_amax / GEMM_ALPHA_DIVISOR
        bias = None if self.bias is None else self.bias.float()
        if x.device.type != "cpu":  # no host sync for alpha on accelerators
            out = (a @ w.T).mul_(alpha)
            return (out if bias is None else out.add_(bias)).to(x.dtype).reshape(*lead, self.out_features)
        if self.pointwise_conv and x.dim() == 4:
            return self._pointwise_conv_gemm(a.view(x.shape), w, alpha.item(), bias).to(x.dtype)
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        if bias is None:  # alpha and bias fused into the GEMM (one pass over the output)
            torch.addmm(out, a, w.T, beta=0, alpha=alpha.item(), out=out)
        else:
            torch.addmm(bias, a, w.T, alpha=alpha.item(), out=out)
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def _pointwise_conv_gemm(self, a: torch.Tensor, w: torch.Tensor, alpha: float,
                             bias: torch.Tensor | None) -> torch.Tensor:
        """(B, H, W, C) activations through the kernel of the 1x1 convolution this layer replaces (oneDNN
        on CPU, much faster than the BLAS GEMM on some CPUs), channels-last in and out. alpha goes into
        the smaller operand: the weight (more tokens than input channels) or the output."""
        a = a.permute(0, 3, 1, 2)
        shape = (self.out_features, self.in_features, 1, 1)
        if a.numel() // self.in_features >= self.in_features:
            out = F.conv2d(a, w.mul(alpha).view(shape), bias)
        else:
            out = F.conv2d(a, w.view(shape))
            if bias is None:
                out.mul_(alpha)
            else:
                torch.add(bias.view(1, -1, 1, 1), out, alpha=alpha, out=out)
        return out.permute(0, 2, 3, 1)


class Int8DynamicLinear(QuantizedLayer):
    """CPU int8 (fbgemm): per-channel int8 weights, activations quantized per call. Fast, approximate."""

    backend = "cpu_int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "", pointwise_conv: bool = False):
        w = as_matrix(weight)
        if w.device.type != "cpu":
            raise ValueError(f"{name}: backend cpu_int8 needs CPU weights, got {w.device}")
        super().__init__(w.shape[1], w.shape[0], name, pointwise_conv)
        self.refresh(weight, bias)

    def refresh(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = as_matrix(weight).float()
        scales = (w.abs().amax(1).clamp(min=1e-12) / 127).double()
        with warnings.catch_warnings():  # quantized dtypes are deprecated in torch but still work in 2.14
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.zeros_like(scales, dtype=torch.long)
            self._qweight = torch.quantize_per_channel(w, scales, zero, 0, torch.qint8)
        self._bias = None if bias is None else bias.detach().float().clone()
        self._packed = torch.ops.quantized.linear_prepack(self._qweight, self._bias)

    def current_bias(self) -> torch.Tensor | None:
        return self._bias

    def dequantized_weight(self) -> torch.Tensor:
        return self._qweight.dequantize()

    @property
    def weight_nbytes(self) -> int:
        return self._qweight.numel() + 4 * self.out_features  # int8 values + one fp32 scale per row

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed).to(x.dtype)


class TELinear(QuantizedLayer):
    """Transformer Engine linear on a GPU: NVFP4BlockScaling (sm_100+) or Float8CurrentScaling (sm_89/90)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, name: str = "",
                 tile: tuple[int, int] = (16, 16), pointwise_conv: bool = False):
        te = import_transformer_engine()
        if te is None:
            raise ValueError(f"{name}: backend {backend} needs transformer_engine, which does not import here")
        from transformer_engine.common import recipe as te_recipe  # noqa: PLC0415

        w = as_matrix(weight)
        super().__init__(w.shape[1], w.shape[0], name, pointwise_conv)
        self.backend = backend
        self.tile = tuple(tile)
        if backend == "te_nvfp4":
            # Inference drafting: no random Hadamard transform, no stochastic rounding (see the spec).
            self.recipe = te_recipe.NVFP4BlockScaling(disable_rht=True, disable_stochastic_rounding=True,
                                                      disable_2d_quantization=self.tile == (1, 16))
        elif backend == "te_fp8":
            self.recipe = te_recipe.Float8CurrentScaling()
        else:
            raise ValueError(f"{name}: TELinear does not implement backend '{backend}'")
        self._te = te
        self.inner = te.Linear(self.in_features, self.out_features, bias=bias is not None,
                               params_dtype=w.dtype, device=w.device)
        self.refresh(weight, bias)

    def refresh(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.inner.weight.copy_(as_matrix(weight))
            if bias is not None:
                self.inner.bias.copy_(bias.detach())

    def current_bias(self) -> torch.Tensor | None:
        return getattr(self.inner, "bias", None)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.inner.weight.detach()
        if self.backend == "te_nvfp4":
            return quantize(w, self.tile, name=self.name).dequantize()
        amax = w.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
        return (w.float() * (E4M3_MAX / amax)).to(torch.float8_e4m3fn).float() * (amax / E4M3_MAX)

    @property
    def weight_nbytes(self) -> int:
        n = self.in_features * self.out_features
        return n * 9 // 16 + 4 if self.backend == "te_nvfp4" else n + 4

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # te.Linear flattens its input with view(-1, in_features): a 1x1 conv's channels-last view
        # (x.movedim(1, -1)) is not contiguous and would be rejected.
        with self._te.autocast(enabled=True, recipe=self.recipe):
            return self.inner(x.contiguous())


def make_quantized_layer(backend: str, module: nn.Module, name: str, tile: tuple[int, int],
                         cache_dequantized: bool, channels_first: bool | None = None) -> QuantizedLayer:
    """Build the `backend` replacement for an nn.Linear or a 1x1 nn.Conv2d (channels_first: input B,C,H,W)."""
    pointwise = isinstance(module, nn.Conv2d) if channels_first is None else channels_first
    if backend == "emulated":
        return NVFP4Linear(module.weight, module.bias, name, tile, cache_dequantized, pointwise)
    if backend == "cpu_int8":
        return Int8DynamicLinear(module.weight, module.bias, name, pointwise)
    if backend in ("te_nvfp4", "te_fp8"):
        return TELinear(module.weight, module.bias, backend, name, tile, pointwise)
    raise ValueError(f"{name}: backend '{backend}' does not build quantized layers")
