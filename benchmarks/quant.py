"""NVFP4 quantization benchmark: quantizer speed, emulated W4A4 / int8 linears vs fp32, weight bytes.

    python benchmarks/quant.py            # 4096x4096 weight, 1024x4096 activation; real-width layers
    python benchmarks/quant.py --quick    # small shapes, seconds

A and B run interleaved in each repeat; the table quotes medians and ratios, written to
benchmarks/results/quant.md (or --out). A second table runs the layers of real models at their
published widths (SANA-1600M, FLUX.1) as each explorer runs them: the GEMMs dominate there, unlike
in the embedded model's 128-wide layers (see benchmarks/rollout.py for whole model steps).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.quant import Int8DynamicLinear, NVFP4Linear, quantize  # noqa: E402
from solrl_core.quant.nvfp4 import quantize_dequantize_unscaled  # noqa: E402

FLT_MAX = torch.finfo(torch.float32).max


def quantize_straightforward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec formula written plainly in torch (1x16 blocks): the baseline our quantizer is timed against."""
    x = x.float()
    m, k = x.shape
    amax = x.abs().max()
    s_enc = torch.where(amax == 0, torch.ones_like(amax), (2688.0 / amax).clamp(max=FLT_MAX))
    s_dec = 1.0 / s_enc
    blocks = x.view(m, k // 16, 16)
    block_amax = blocks.abs().amax(-1)
    s_blk = (block_amax * (s_enc * torch.tensor(1 / 6))).clamp(-448, 448).to(torch.float8_e4m3fn)
    enc = (1.0 / (s_blk.float() * s_dec)).clamp(max=FLT_MAX)
    v = (blocks * enc.unsqueeze(-1)).clamp(-6, 6).view(m, k)
    a = v.abs()
    code = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5)
            + (a > 5.0))
    code = code | (torch.signbit(v).to(torch.uint8) << 3)
    return code[:, 0::2] | (code[:, 1::2] << 4), s_blk


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so load changes hit all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (1024x1024 weight, 256x1024 activation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k, m = (1024, 1024, 256) if args.quick else (4096, 4096, 1024)
    weight = torch.randn(n, k) * 0.02
    bias = torch.randn(n) * 0.01
    x = torch.randn(m, k)

    ours, plain = quantize(weight), quantize_straightforward(weight)
    assert torch.equal(ours.packed, plain[0]) and torch.equal(ours.block_scales.view(torch.uint8),
                                                              plain[1].view(torch.uint8))
    weight_bf16 = weight.bfloat16()
    fused = quantize_dequantize_unscaled(x)[0]
    assert torch.equal(fused.view(torch.int32), quantize(x).dequantize_unscaled().view(torch.int32))
    t_quant = interleaved({"ours": lambda: quantize(weight), "plain": lambda: quantize_straightforward(weight),
                           "ours_bf16": lambda: quantize(weight_bf16),
                           "act_packed": lambda: quantize(x).dequantize_unscaled(),
                           "act_fused": lambda: quantize_dequantize_unscaled(x)}, args.repeats)

    w4a4 = NVFP4Linear(weight, bias, "bench", tile=(16, 16))
    w4a4_cached = NVFP4Linear(weight, bias, "bench", tile=(16, 16), cache_dequantized=True)
    int8 = Int8DynamicLinear(weight, bias, "bench")
    with torch.no_grad():
        t_lin = interleaved({"fp32": lambda: F.linear(x, weight, bias), "w4a4": lambda: w4a4(x),
                             "w4a4_cached": lambda: w4a4_cached(x), "int8": lambda: int8(x)}, args.repeats)
        ref = F.linear(x, weight, bias)
        err = {name: ((layer(x) - ref).norm() / ref.norm()).item()
               for name, layer in (("w4a4", w4a4), ("int8", int8))}

    ms = {name: 1000 * s for name, s in {**t_quant, **t_lin}.items()}
    rows = [
        ("quantize, straightforward torch (fp32)", ms["plain"], "1.00x", ""),
        ("quantize, solrl (fp32)", ms["ours"], f"{t_quant['plain'] / t_quant['ours']:.2f}x faster", "bit-identical"),
        ("quantize, solrl (bf16 input)", ms["ours_bf16"],
         f"{t_quant['plain'] / t_quant['ours_bf16']:.2f}x faster", ""),
        ("activation quantize + dequantize, packed path", ms["act_packed"], "1.00x", ""),
        ("activation quantize-dequantize, fused (W4A4 activation path)", ms["act_fused"],
         f"{t_quant['act_packed'] / t_quant['act_fused']:.2f}x faster", "bit-identical"),
        ("linear fp32", ms["fp32"], "1.00x", "reference"),
        ("linear emulated W4A4 NVFP4", ms["w4a4"], f"{t_lin['fp32'] / t_lin['w4a4']:.2f}x",
         f"rel. error {err['w4a4']:.4f}"),
        ("linear emulated W4A4, dequantized weight cached", ms["w4a4_cached"],
         f"{t_lin['fp32'] / t_lin['w4a4_cached']:.2f}x", f"rel. error {err['w4a4']:.4f}"),
        ("linear cpu_int8 (fbgemm dynamic)", ms["int8"], f"{t_lin['fp32'] / t_lin['int8']:.2f}x",
         f"rel. error {err['int8']:.4f}"),
    ]
    numel = n * k
    byte_rows = [("fp32", 4 * numel), ("bf16", 2 * numel), ("NVFP4 (packed + E4M3 scales + fp32 scale)", ours.nbytes),
                 ("int8 (+ fp32 scale per row)", int8.weight_nbytes)]
    lines = [
        f"# Quantization benchmark ({'quick' if args.quick else 'full'})",
        "",
        f"`python benchmarks/quant.py{' --quick' if args.quick else ''}`: torch {torch.__version__}, "
        f"{args.threads} thread(s), median of {args.repeats} interleaved repeats. "
        f"Weight {n}x{k}, activation {m}x{k} (the activation rows quantize the activation). Speed ratio > 1 "
        "means faster than the baseline row; "
        f"absolute times move with machine load, the interleaved ratios are the result.",
        "",
        "| what | median ms | vs baseline | note |",
        "|---|---:|---:|---|",
        *[f"| {what} | {t:.1f} | {ratio} | {note} |" for what, t, ratio, note in rows],
        "",
        "| weight storage | bytes | bytes / element |",
        "|---|---:|---:|",
        *[f"| {what} | {b:,} | {b / numel:.4f} |" for what, b in byte_rows],
        "",
    ]
    lines += real_width_layers(args.quick, args.repeats, args.threads)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


# --- layers at real widths --------------------------------------------------------------------------

# (model, layer, in, out, 1x1 conv?) at the published widths (docs: spec/platform.md).
REAL_LAYERS = (
    ("SANA-1600M", "attention projection", 2240, 2240, False),
    ("SANA-1600M", "feed-forward conv_inverted (1x1 conv)", 2240, 11200, True),
    ("SANA-1600M", "feed-forward conv_point (1x1 conv)", 5600, 2240, True),
    ("FLUX.1", "attention projection", 3072, 3072, False),
)


def _real_width_activation(tokens: int, cin: int, conv: bool) -> torch.Tensor:
    """(1, tokens, C) for a linear; square channels-last images for a 1x1 conv (SANA's feed-forward)."""
    if not conv:
        return torch.randn(1, tokens, cin)
    images = max(1, tokens // 1024)
    side = math.isqrt(tokens // images)
    return torch.randn(images, side, side, cin).permute(0, 3, 1, 2)


def _time_real_layer(cin: int, cout: int, conv: bool, tokens: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    layer = (torch.nn.Conv2d(cin, cout, 1) if conv else torch.nn.Linear(cin, cout)).requires_grad_(False)
    x = _real_width_activation(tokens, cin, conv)
    emulated = NVFP4Linear(layer.weight, layer.bias, "x", tile=(16, 16), cache_dequantized=True, pointwise_conv=conv)
    int8 = Int8DynamicLinear(layer.weight, layer.bias, "x", pointwise_conv=conv)
    with torch.no_grad():
        return interleaved({"fp32": lambda: layer(x), "emulated": lambda: emulated(x), "int8": lambda: int8(x)},
                           repeats)


def real_width_layers(quick: bool, repeats: int, threads: int) -> list[str]:
    """fp32 vs emulated W4A4 (cached dequantized weight, as the explorer runs) vs cpu_int8 per layer."""
    tokens = 256 if quick else 2048  # 2048: two 1024 px SANA images (32x32 latents), or one FLUX 1024 px image
    rows = []
    for model, what, cin, cout, conv in REAL_LAYERS:
        t = _time_real_layer(cin, cout, conv, tokens, repeats)
        rows.append(f"| {model} | {what} | {cin} -> {cout} | {1000 * t['fp32']:.0f} | "
                    f"{t['emulated'] / t['fp32']:.2f}x | {t['fp32'] / t['int8']:.2f}x |")
    return [
        "",
        "## Layers at real widths",
        "",
        f"{tokens} tokens per call, {threads} thread(s), median of {repeats} interleaved repeats; "
        "weights random at the published shapes. Emulated W4A4 as the explorer runs it (activation "
        "quantize-dequantize, dequantized weight cached); the 1x1 convs take channels-last input as in SANA.",
        "",
        "| model | layer | in -> out | fp32 ms | emulated W4A4 cost vs fp32 | cpu_int8 speed-up vs fp32 |",
        "|---|---|---|---:|---:|---:|",
        *rows,
        "",
    ]


if __name__ == "__main__":
    main()
