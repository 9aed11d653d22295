"""NVFP4 format: E2M1 elements in blocks of 16 with an E4M3 block scale and an FP32 tensor scale.

The arithmetic is Transformer Engine's quantizer (see the project's NVFP4 spec), reproduced bit for
bit in fp32. The implementation is vectorised over row chunks of about a megabyte per CPU thread
so that its work buffers stay in cache, and those buffers are kept per thread between calls (on
CPUs, first-touching fresh multi-megabyte temporaries costs more than the arithmetic itself).

Two entry points: `quantize` (packed codes and E4M3 scales: weights, checkpoints) and
`quantize_dequantize_unscaled` (the activation path of the emulated W4A4 linear: the same
rounding, straight to dequantized values, no packing).
"""
from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_RANGE = E2M1_MAX * E4M3_MAX  # 2688: amax maps here
BLOCK = 16
FLT_MAX = torch.finfo(torch.float32).max
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WEIGHT_TILES = ((1, 16), (16, 16))

# Decoded magnitude of each 4-bit code (bit 3 is the sign).
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)
# Both nibbles of every byte decoded at once: row b holds (value of low nibble, value of high nibble).
_BYTE_TO_PAIR = torch.stack([E2M1_VALUES[torch.arange(256) & 15], E2M1_VALUES[torch.arange(256) >> 4]], 1)

_CHUNK_ELEMENTS = 1 << 18  # per thread (1 MiB of fp32): the fastest of 2^16..2^21 on a 1 MiB-L2 CPU
_F32_EXPONENT_MASK = 0x7F800000
_F32_ONE_BITS = 0x3F800000
_F32_SIGN_BIT = -(1 << 31)  # 0x80000000 as an int32
_F32_MANTISSA_BITS = 23


@dataclass
class NVFP4Tensor:
    """A quantized tensor. Decoded value = e2m1(packed) * float(block_scales) * tensor_scale."""

    packed: torch.Tensor  # uint8 (..., K/2); element 2i in the low nibble
    block_scales: torch.Tensor  # float8_e4m3fn (..., K/16); 16x16 tiles repeated per row
    tensor_scale: torch.Tensor  # fp32 scalar, decode scale = amax / 2688
    amax: torch.Tensor  # fp32 scalar, max |x| of the source tensor
    tile: tuple[int, int] = (1, 16)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    @property
    def nbytes(self) -> int:
        """Storage: 0.5 B per element + 1/16 B of block scale per element + 4 B tensor scale."""
        return self.packed.numel() + self.block_scales.numel() + 4

    def dequantize_unscaled(self) -> torch.Tensor:
        """e2m1 * block_scale in fp32 (exact: at most 2+4 significant bits), without the tensor scale."""
        k = self.shape[-1]
        packed = self.packed.reshape(-1, k // 2)
        scales = _e4m3_to_float(self.block_scales).reshape(-1, k // BLOCK, 1)
        out = torch.empty(packed.shape[0], k, dtype=torch.float32, device=packed.device)
        if _denormals_preserved():
            _decode_scaled(packed, scales, out)
        else:
            lut = _BYTE_TO_PAIR.to(packed.device)
            torch.index_select(lut, 0, packed.reshape(-1).int(), out=out.view(-1, 2))
            out.view(-1, k // BLOCK, BLOCK).mul_(scales)
        return out.reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_unscaled().mul_(self.tensor_scale).to(dtype)

    def to(self, device: torch.device | str) -> NVFP4Tensor:
        return NVFP4Tensor(self.packed.to(device), self.block_scales.to(device),
                           self.tensor_scale.to(device), self.amax.to(device), self.tile)


def _fp32(value: float) -> float:
    """Round a Python float to the nearest fp32 value (ties to even)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _tensor_scales(amax: float) -> tuple[float, float]:
    """(S_dec, S_enc * (1/6)) as exact fp32 values, from the fp32 tensor amax.

    One fp32 operation each, done in double and rounded once: for +, *, / of fp32 operands that
    gives the correctly rounded fp32 result (double has more than 2 * 24 + 2 bits), so this is
    Transformer Engine's fp32 arithmetic without a round of tiny tensor ops per call.
    """
    s_enc = 1.0 if amax == 0 else _fp32(min(NVFP4_RANGE / amax, FLT_MAX))
    return _fp32(1.0 / s_enc), _fp32(s_enc * _fp32(1 / E2M1_MAX))


# Every E4M3 byte decoded (torch's own cast; index 0x7F / 0xFF decode to NaN): the table lookup is
# several times faster than the element-wise float8 -> float32 cast on CPU.
_E4M3_DECODE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _e4m3_to_float(scales: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exact (a table lookup on CPU)."""
    if scales.device.type != "cpu":
        return scales.float()
    codes = scales.view(torch.uint8).reshape(-1).int()
    return torch.index_select(_E4M3_DECODE, 0, codes).view(scales.shape)


def _label(name: str | None) -> str:
    return f"'{name}'" if name else "tensor"


def _check_input(x: torch.Tensor, tile: tuple[int, int], name: str | None) -> None:
    label = _label(name)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"NVFP4 quantize of {label}: dtype {x.dtype} unsupported (use float32, bfloat16 or float16)")
    if tile not in WEIGHT_TILES:
        raise ValueError(f"NVFP4 quantize of {label}: tile {tile} unsupported (use (1, 16) or (16, 16))")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 quantize of {label}: last dim (K) of shape {tuple(x.shape)} is not a multiple of 16")
    if tile == (16, 16) and (x.dim() < 2 or (x.numel() // x.shape[-1]) % BLOCK):
        raise ValueError(f"NVFP4 quantize of {label}: 16x16 tiles need rows a multiple of 16, got shape {tuple(x.shape)}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1])
    return rows if rows.is_contiguous() else rows.contiguous()


def _chunks(n_rows: int, k: int, device: torch.device, multiple: int = 1) -> list[tuple[int, int]]:
    """Row ranges (a multiple of `multiple` rows each) of about _CHUNK_ELEMENTS elements per CPU thread,
    so that a chunk's work buffers stay in the cores' caches; one range on other devices."""
    if device.type != "cpu":
        return [(0, n_rows)] if n_rows else []
    per_chunk = _CHUNK_ELEMENTS * max(1, torch.get_num_threads())
    step = max(multiple, (per_chunk // k) // multiple * multiple)
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class _Workspace(threading.local):
    """Per-thread scratch buffers kept between calls on CPU: allocating fresh megabyte temporaries on
    every call costs page faults that exceed the arithmetic. Buffers above SCRATCH_KEEP_BYTES are not kept."""

    def get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        buf = self.__dict__.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            if device.type == "cpu" and numel * buf.element_size() <= SCRATCH_KEEP_BYTES:
                self.__dict__[slot] = buf
        return buf[:numel]


SCRATCH_KEEP_BYTES = 64 << 20
_WORKSPACE = _Workspace()


def scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A flat per-thread scratch tensor named `slot`, reused by later calls (CPU): its contents are
    valid until the next call for the same slot on this thread."""
    return _WORKSPACE.get(slot, numel, dtype, device)


def _magnitudes(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|x| as fp32 into `out` (an exact upcast for bf16 / fp16)."""
    if x.dtype == torch.float32:
        return torch.abs(x, out=out)
    return out.copy_(x).abs_()  # abs has no mixed-dtype out= variant


def _block_amax(rows: torch.Tensor, spans: list[tuple[int, int]], mag: torch.Tensor) -> torch.Tensor:
    """Max |x| of each 1x16 block, (rows, K/16) fp32, walking `spans`. `mag` receives |x|: either
    (rows, K), every chunk in its own rows, or one chunk's scratch rows reused by every chunk.

    Non-negative floats order like their bit patterns, and the integer max is the faster reduction.
    """
    n, k = rows.shape
    bits = torch.empty(n, k // BLOCK, dtype=torch.int32, device=rows.device)
    reuse = mag.shape[0] < n
    for start, stop in spans:
        m = _magnitudes(rows[start:stop], mag[:stop - start] if reuse else mag[start:stop])
        torch.amax(m.view(torch.int32).view(stop - start, k // BLOCK, BLOCK), -1, out=bits[start:stop])
    return bits.view(torch.float32)


def _block_scales(block_amax: torch.Tensor, tile_rows: int,
                  name: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor amax, E4M3 block scales, the same as fp32, fp32 per-block encode scales) from the 1x16
    block maxima."""
    amax = block_amax.max() if block_amax.numel() else block_amax.new_zeros(())
    amax_value = amax.item()
    if not math.isfinite(amax_value):
        raise ValueError(f"NVFP4 quantize of {_label(name)}: input contains NaN or Inf")
    s_dec, s_enc_over_6 = _tensor_scales(amax_value)
    if tile_rows > 1:
        n = block_amax.shape[0]
        block_amax = block_amax.view(n // tile_rows, tile_rows, -1).amax(1).repeat_interleave(tile_rows, 0)
    s_blk = (block_amax * s_enc_over_6).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
    s_blk_f = _e4m3_to_float(s_blk)
    enc = torch.reciprocal(s_blk_f * s_dec).clamp_(max=FLT_MAX)
    return amax, s_blk, s_blk_f, enc


def _scaled_magnitudes(mag: torch.Tensor, enc: torch.Tensor, saturate: bool = True) -> torch.Tensor:
    """|x| * enc clamped to 6 (|x * enc| == |x| * enc since enc > 0), in place on (rows, K)."""
    n, k = mag.shape
    mag.view(n, k // BLOCK, BLOCK).mul_(enc.unsqueeze(-1))
    return mag.clamp_(max=E2M1_MAX) if saturate else mag


def quantize(x: torch.Tensor, tile: tuple[int, int] = (1, 16), name: str | None = None) -> NVFP4Tensor:
    """Quantize `x` (..., K) to NVFP4 with Transformer Engine's arithmetic, blocks of 16 along K.

    tile=(16, 16) shares one scale per 16x16 tile (stored repeated per row), as TE does for weights.
    Raises a one-line ValueError naming `name` for bad shapes, dtypes or non-finite input.
    """
    tile = tuple(tile)
    _check_input(x, tile, name)
    rows = _as_rows(x)
    n_rows, k = rows.shape
    spans = _chunks(n_rows, k, x.device, tile[0])
    chunk = spans[0][1] if spans else 0
    mag = _WORKSPACE.get("mag", chunk * k, torch.float32, x.device).view(chunk, k)
    amax, s_blk, _, enc = _block_scales(_block_amax(rows, spans, mag), tile[0], name)

    packed = torch.empty(n_rows, k // 2, dtype=torch.uint8, device=x.device)
    exp = _WORKSPACE.get("exp", chunk * k, torch.int32, x.device).view(chunk, k)
    pair = _WORKSPACE.get("pair", chunk * k // 2, torch.int64, x.device).view(chunk, k // 2)
    sign = _WORKSPACE.get("sign", chunk * k, torch.bool, x.device).view(chunk, k)
    for start, stop in spans:
        r = stop - start
        m = _scaled_magnitudes(_magnitudes(rows[start:stop], mag[:r]), enc[start:stop])
        codes = _e2m1_magnitude_codes(m, exp[:r])
        _add_sign_bits(rows[start:stop], codes, exp[:r], sign[:r])
        # Pack pairs through a 64-bit view: one int64 holds (code 2i, code 2i+1 << 32), little-endian, so
        # (v | v >> 28) has code 2i in bits 0-3 and code 2i+1 in bits 4-7; the uint8 cast keeps that byte.
        pairs = codes.view(torch.int64)
        torch.bitwise_right_shift(pairs, 28, out=pair[:r])
        pair[:r].bitwise_or_(pairs)
        packed[start:stop].copy_(pair[:r])
    lead = x.shape[:-1]
    return NVFP4Tensor(packed.reshape(*lead, k // 2), s_blk.reshape(*lead, k // BLOCK),
                       amax / NVFP4_RANGE, amax, tile)


def quantize_dequantize_unscaled(x: torch.Tensor, out: torch.Tensor | None = None,
                                 name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(x) followed by dequantize_unscaled(), fused, without packing: (values, amax).

    values: e2m1 * block_scale in fp32 with the shape of `x` (1x16 blocks), bit-identical to
    quantize(x).dequantize_unscaled() including the sign of zeros; amax: the fp32 tensor amax.
    The magnitudes are rounded straight onto the E2M1 grid and multiplied by the block scale; no
    codes are formed. `out` (optional, fp32, x.numel() elements) receives the values. This is the
    activation path of the emulated W4A4 linear.
    """
    _check_input(x, (1, 16), name)
    rows = _as_rows(x)
    n_rows, k = rows.shape
    if out is None:
        out = torch.empty(n_rows, k, dtype=torch.float32, device=x.device)
    out = out.view(n_rows, k)
    spans = _chunks(n_rows, k, x.device)
    block_amax = _block_amax(rows, spans, out)
    amax, _, scale, enc = _block_scales(block_amax, 1, name)
    scale = scale.unsqueeze(-1)
    # The clamp to 6 only changes a result where |x| * enc reaches 7 (below, the rounding gives 6 anyway);
    # the largest product of each block tells whether any element does (rare: E4M3 subnormal scales).
    saturate = bool(enc.numel()) and torch.mul(block_amax, enc).max().item() >= 7.0
    chunk = spans[0][1] if spans else 0
    anchor = _WORKSPACE.get("exp", chunk * k, torch.int32, x.device).view(chunk, k)
    for start, stop in spans:  # `out` holds |x| from the block maxima pass
        r = stop - start
        m = _scaled_magnitudes(out[start:stop], enc[start:stop], saturate)
        c = _grid_anchor(m, anchor[:r]).view(torch.float32)
        m.add_(c).sub_(c)  # round to the E2M1 grid
        m.view(r, k // BLOCK, BLOCK).mul_(scale[start:stop])
        _restore_signs(m, rows[start:stop], anchor[:r])  # -0.0 and values rounding to 0 keep their sign
    return out.view(x.shape), amax


def _restore_signs(mag: torch.Tensor, x: torch.Tensor, work: torch.Tensor) -> None:
    """Give the non-negative fp32 `mag` the signs of x (two integer ops beat copysign for fp32 x)."""
    if x.dtype == torch.float32:
        torch.bitwise_and(x.view(torch.int32), _F32_SIGN_BIT, out=work)
        mag.view(torch.int32).bitwise_or_(work)
    else:
        mag.copysign_(x)


def _add_sign_bits(x: torch.Tensor, codes: torch.Tensor, scratch: torch.Tensor, sign: torch.Tensor) -> None:
    """Set bit 3 of each code where x has its sign bit set (so -0.0 and tiny negatives keep their sign)."""
    if x.dtype == torch.float32:
        torch.bitwise_right_shift(x.view(torch.int32), 28, out=scratch)  # sign bit -> bit 3 (and above)
        codes.bitwise_or_(scratch.bitwise_and_(8))
    else:
        torch.signbit(x, out=sign)
        codes.add_(sign, alpha=8)


def _grid_anchor(mag: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Bits of C = 2^22 * max(1, 2^floor(log2 m)) per magnitude m in [0, 7), into `anchor` (int32).

    Adding C rounds m to the E2M1 grid in one IEEE addition (round to nearest even): the ulp of C
    equals the grid step, 0.5 below 2 (subnormals and [1, 2)), 1 in [2, 4), 2 in [4, 8) (so a
    magnitude in (6, 7) rounds to 6, as it would after clamping to 6).
    """
    torch.bitwise_and(mag.view(torch.int32), _F32_EXPONENT_MASK, out=anchor).clamp_(min=_F32_ONE_BITS)
    return anchor.add_((_F32_MANTISSA_BITS - 1) << _F32_MANTISSA_BITS)


def _e2m1_magnitude_codes(mag: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of magnitudes in [0, 6] onto the E2M1 grid; returns 3-bit codes (int32).

    After adding the anchor C (see _grid_anchor), the code is (ulps above C) + 2 * (octave above
    [1, 2)). Overwrites `mag` and `exp`.
    """
    bits = mag.view(torch.int32)
    _grid_anchor(mag, exp)
    mag.add_(exp.view(torch.float32))
    bits.sub_(exp)  # number of grid steps above C
    exp.sub_(_F32_ONE_BITS + ((_F32_MANTISSA_BITS - 1) << _F32_MANTISSA_BITS)).bitwise_right_shift_(
        _F32_MANTISSA_BITS - 1)  # 0, 2, 4 for the octaves [0, 2), [2, 4), [4, 6]
    return bits.add_(exp)


# Decoding bytes to fp32 bit patterns: code c has its magnitude bits at 0-2 and sign at bit 3; placed at
# bits 22-24 and 31 they form the fp32 number e2m1(c) * 2^-126 (codes 0 and 1 land on subnormals, exactly
# like E2M1's own subnormal). One int64 handles both nibbles of a byte (low nibble -> low word).
_MAG_SHIFT = (1 << 22) + (1 << 50)
_SIGN_SHIFT = (1 << 28) + (1 << 56)
_MAG_MASK = 0x01C00000 | (0x01C00000 << 32)
_SIGN_MASK = (0x80000000 | (0x80000000 << 32)) - (1 << 64)  # as a signed int64
_HALF_UNBIAS = 2.0**63  # 2^-126 is undone in two exact steps: 448 * 2^126 would overflow fp32


def _denormals_preserved() -> bool:
    """False when torch.set_flush_denormal(True) is in effect (the bit-pattern decoder needs subnormals)."""
    return (torch.tensor(2.0**-140) * _HALF_UNBIAS).item() != 0.0


def _decode_scaled(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """out (rows, K) = e2m1(packed) * scales, exact; processed in row chunks to stay in cache."""
    rows, half = packed.shape
    words = out.view(torch.int64)  # (rows, K/2): one int64 per byte
    chunk = max(1, _CHUNK_ELEMENTS // (2 * half))
    sign = torch.empty(min(chunk, rows), half, dtype=torch.int64, device=packed.device)
    scales = scales * _HALF_UNBIAS
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        w, s = words[start:stop], sign[: stop - start]
        w.copy_(packed[start:stop])
        torch.mul(w, _SIGN_SHIFT, out=s).bitwise_and_(_SIGN_MASK)
        w.mul_(_MAG_SHIFT).bitwise_and_(_MAG_MASK).bitwise_or_(s)
        out[start:stop].view(stop - start, -1, BLOCK).mul_(scales[start:stop]).mul_(_HALF_UNBIAS)
