"""NVFP4 format: E2M1 elements in blocks of 16 with an E4M3 block scale and an FP32 tensor scale.

The arithmetic is Transformer Engine's quantizer (see the project's NVFP4 spec), reproduced bit for
bit in fp32. The implementation is vectorised over whole row chunks; it walks the rows in chunks
of about one megabyte so that its work buffers stay in cache and are allocated once per call
(on CPUs, first-touching fresh 64 MB temporaries costs more than the arithmetic itself).
"""
from __future__ import annotations

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

_CHUNK_ELEMENTS = 1 << 17
_F32_EXPONENT_MASK = 0x7F800000
_F32_ONE_BITS = 0x3F800000
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
        scales = self.block_scales.reshape(-1, k // BLOCK, 1).float()
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


def encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """S_enc = min(2688 / amax, FLT_MAX), 1 when amax == 0 (fp32 scalar)."""
    amax = amax.float()
    s_enc = (torch.tensor(NVFP4_RANGE, device=amax.device) / amax).clamp(max=FLT_MAX)
    return torch.where(amax == 0, torch.ones_like(s_enc), s_enc)


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


def quantize(x: torch.Tensor, tile: tuple[int, int] = (1, 16), name: str | None = None) -> NVFP4Tensor:
    """Quantize `x` (..., K) to NVFP4 with Transformer Engine's arithmetic, blocks of 16 along K.

    tile=(16, 16) shares one scale per 16x16 tile (stored repeated per row), as TE does for weights.
    Raises a one-line ValueError naming `name` for bad shapes, dtypes or non-finite input.
    """
    tile = tuple(tile)
    _check_input(x, tile, name)
    x = x.detach()
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    lo, hi = torch.aminmax(rows) if rows.numel() else (rows.new_zeros(()), rows.new_zeros(()))
    amax = torch.maximum(-lo, hi).float()
    if not torch.isfinite(amax):
        raise ValueError(f"NVFP4 quantize of {_label(name)}: input contains NaN or Inf")
    s_enc = encode_scale(amax)
    s_dec = torch.reciprocal(s_enc)
    s_enc_over_6 = s_enc * torch.tensor(1 / E2M1_MAX, dtype=torch.float32, device=x.device)

    n_rows = rows.shape[0]
    packed = torch.empty(n_rows, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n_rows, k // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
    tile_rows = tile[0]
    chunk = max(tile_rows, (_CHUNK_ELEMENTS // k) // tile_rows * tile_rows)
    work = _Workspace(min(chunk, n_rows), k, x.device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        _quantize_rows(rows[start:stop], tile_rows, s_enc_over_6, s_dec,
                       packed[start:stop], scales[start:stop], work)
    lead = x.shape[:-1]
    return NVFP4Tensor(packed.reshape(*lead, k // 2), scales.reshape(*lead, k // BLOCK),
                       amax / NVFP4_RANGE, amax, tile)


class _Workspace:
    """Buffers reused across row chunks."""

    def __init__(self, rows: int, k: int, device: torch.device):
        self.mag = torch.empty(rows, k, dtype=torch.float32, device=device)
        self.exp = torch.empty(rows, k, dtype=torch.int32, device=device)
        self.sign = torch.empty(rows, k, dtype=torch.bool, device=device)
        self.pair = torch.empty(rows, k // 2, dtype=torch.int64, device=device)

    def view(self, rows: int) -> tuple[torch.Tensor, ...]:
        return self.mag[:rows], self.exp[:rows], self.sign[:rows], self.pair[:rows]


def _quantize_rows(x: torch.Tensor, tile_rows: int, s_enc_over_6: torch.Tensor, s_dec: torch.Tensor,
                   packed_out: torch.Tensor, scales_out: torch.Tensor, work: _Workspace) -> None:
    n, k = x.shape
    mag, exp, sign, pair = work.view(n)
    if x.dtype == torch.float32:
        torch.abs(x, out=mag)
    else:  # upcast is exact; abs has no mixed-dtype out= variant
        mag.copy_(x).abs_()
    # Max over each block of 16; non-negative floats order like their bit patterns (faster as int).
    block_amax = mag.view(torch.int32).view(n, k // BLOCK, BLOCK).amax(-1).view(torch.float32)
    if tile_rows > 1:
        block_amax = block_amax.view(n // tile_rows, tile_rows, -1).amax(1).repeat_interleave(tile_rows, 0)
    s_blk = (block_amax * s_enc_over_6).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
    scales_out.copy_(s_blk)
    enc = torch.reciprocal(s_blk.float() * s_dec).clamp_(max=FLT_MAX)
    # |x * enc| == |x| * enc since enc > 0, so scale the magnitudes and take the sign from x.
    mag.view(n, k // BLOCK, BLOCK).mul_(enc.unsqueeze(-1))
    mag.clamp_(max=E2M1_MAX)
    codes = _e2m1_magnitude_codes(mag, exp)
    _add_sign_bits(x, codes, exp, sign)
    # Pack pairs through a 64-bit view: one int64 holds (code 2i, code 2i+1 << 32), little-endian, so
    # (v | v >> 28) has code 2i in bits 0-3 and code 2i+1 in bits 4-7; the uint8 cast keeps that byte.
    pairs = codes.view(torch.int64)
    torch.bitwise_right_shift(pairs, 28, out=pair)
    pair.bitwise_or_(pairs)
    packed_out.copy_(pair)


def _add_sign_bits(x: torch.Tensor, codes: torch.Tensor, scratch: torch.Tensor, sign: torch.Tensor) -> None:
    """Set bit 3 of each code where x has its sign bit set (so -0.0 and tiny negatives keep their sign)."""
    if x.dtype == torch.float32:
        torch.bitwise_right_shift(x.view(torch.int32), 28, out=scratch)  # sign bit -> bit 3 (and above)
        codes.bitwise_or_(scratch.bitwise_and_(8))
    else:
        torch.signbit(x, out=sign)
        codes.add_(sign, alpha=8)


def _e2m1_magnitude_codes(mag: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of magnitudes in [0, 6] onto the E2M1 grid; returns 3-bit codes (int32).

    Adding a float C whose ulp equals the grid step rounds to that step in one IEEE addition (RNE).
    The step is 0.5 below 2 (subnormals and [1, 2)), 1 in [2, 4), 2 in [4, 6], so C = 2^22 * max(1,
    2^floor(log2 m)). The code is then (ulps above C) + 2 * (octave above [1, 2)). Overwrites `mag`.
    """
    bits = mag.view(torch.int32)
    torch.bitwise_and(bits, _F32_EXPONENT_MASK, out=exp).clamp_(min=_F32_ONE_BITS)
    exp.add_((_F32_MANTISSA_BITS - 1) << _F32_MANTISSA_BITS)  # bits of C
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
