"""Rollout time per iteration: naive full-precision scaling vs Sol-RL, side by side.

    python benchmarks/rollout.py [--weights embedded] [--threads 2] [--repeats 3] [--families sana,flux,sd3]

The paper's comparison on the embedded model: for P prompts, naive scaling samples the whole pool
of N seeds at full precision with F steps; Sol-RL explores the pool with the low-precision explorer
in D steps and regenerates only K seeds with F steps. Both run through the product's stage
functions, interleaved in each repeat; the table quotes medians and ratios and is written to
benchmarks/results/rollout.md. On a CPU the emulated NVFP4 explorer computes in fp32 after
quantizing (it is the faithful reference, not a fast path), so the gain there comes from D < F and
K < N; `cpu_int8` and `cpu_bf16` (CPUs with native bf16) are the fast CPU explorers. On Blackwell GPUs the NVFP4 GEMMs add the
hardware speedup the paper measures.

A second table times one model step of each explorer against one full-precision step on the same
batch (the quickstart's 64 images), and how much of each step the quantizable layers take; a third
times cpu_int8 against fp32 on random-weight transformers of the embedded config at wider widths
(`--widths`), to show what a wider embedded model would do to cpu_int8's step speed-up.

Real-width slices (`--families`): the rollout comparison per model family on a random-weight slice
of the published transformer (real widths, heads and explorer thresholds; one block; a resolution
that gives each explore batch about a thousand GEMM rows), at the paper's proportions
N / K = 96 / 24 = 4 and D / F = 6 / 10 = 0.6 scaled down.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.bundled import QUICKSTART  # noqa: E402
from solrl_core.models import load_policy  # noqa: E402
from solrl_core.quant import QuantizedLayer  # noqa: E402
from solrl_core.quant.backends import cpu_has_native_bf16  # noqa: E402
from solrl_core.rewards import load_weighted_reward  # noqa: E402
from solrl_core.train.prompts import load_prompts  # noqa: E402
from solrl_core.train.session import TrainingSession  # noqa: E402
from solrl_core.train.settings import (  # noqa: E402
    ExploreSettings,
    RegenerateSettings,
    RequantizeSettings,
    SelectSettings,
    SessionConfig,
)
from solrl_core.train.stages import explore, regenerate, select  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.md"


# Explorer layers of the embedded model per backend, as benchmarks/convergence.py's Sol-RL arms:
# NVFP4 with the quickstart's min_dim (4 bits on every layer of so narrow a model scrambles the
# ranking: results/fidelity.md), int8 on every linear (it loses little and gains more).
EMBEDDED_MIN_DIM = {"none": 0, "emulated": QUICKSTART.min_dim, "cpu_int8": 0, "cpu_bf16": 0}
# The CPU's explorers here: cpu_bf16 only where oneDNN runs bf16 natively (it would be slower than fp32).
EXPLORERS = ("emulated", "cpu_int8", *(("cpu_bf16",) if cpu_has_native_bf16() else ()))
EXPLORER_LABELS = {"emulated": "emulated NVFP4", "cpu_int8": "cpu_int8", "cpu_bf16": "cpu_bf16"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="embedded")
    ap.add_argument("--prompts", type=int, default=4, help="P")
    ap.add_argument("--pool", type=int, default=32, help="N")
    ap.add_argument("--keep", type=int, default=8, help="K")
    ap.add_argument("--draft-steps", type=int, default=4, help="D")
    ap.add_argument("--full-steps", type=int, default=10, help="F")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-batch", type=int, default=64, help="images per model step in the per-step table")
    ap.add_argument("--step-repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--widths", default="128,256,384",
                    help="embedded-config widths for the cpu_int8 width sweep ('' for none)")
    add_slice_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    policy = load_policy(args.weights)
    reward = load_weighted_reward("shapes")
    prompts = load_prompts("shapes_all")
    tmp = Path(tempfile.mkdtemp())
    sessions = {}
    for backend in ("none", *EXPLORERS):
        s = TrainingSession(tmp / backend, policy, prompts, SessionConfig(lora_rank=8, lora_alpha=8.0))
        s.refresh_copies(RequantizeSettings(backend, min_dim=EMBEDDED_MIN_DIM[backend]))
        sessions[backend] = s

    keep = SelectSettings(keep=args.keep)

    def naive() -> None:
        s = sessions["none"]
        select(explore(s, reward, ExploreSettings(args.prompts, args.pool, args.full_steps, "full", batch_size=64)),
               keep)

    def sol_rl(backend: str):
        def run() -> None:
            s = sessions[backend]
            kept = select(explore(s, reward, ExploreSettings(args.prompts, args.pool, args.draft_steps, "low", 64)),
                          keep)
            regenerate(kept, reward, RegenerateSettings(args.full_steps, batch_size=64))
        return run

    cases = {"naive scaling (N at full precision, F steps)": naive,
             **{f"Sol-RL, {EXPLORER_LABELS[b]} explorer": sol_rl(b) for b in EXPLORERS}}
    times = interleaved_times(cases, args.repeats)

    base = statistics.median(times[next(iter(cases))])
    lines = [
        "# Rollout time per iteration: naive scaling vs Sol-RL (embedded model, CPU)",
        "",
        f"`python benchmarks/rollout.py`: P={args.prompts} prompts, N={args.pool} seeds each, keep K={args.keep}, "
        f"D={args.draft_steps} draft / F={args.full_steps} full Euler steps, {args.threads} threads, median of "
        f"{args.repeats} interleaved repeats (after a warm-up). Rollout = sampling + scoring + selection "
        "(+ regeneration for Sol-RL); training time is the same for both and not included.",
        "",
        "| rollout | median s | speed-up vs naive |",
        "|---|---:|---:|",
    ]
    for name in cases:
        med = statistics.median(times[name])
        lines.append(f"| {name} | {med:.2f} | {base / med:.2f}x |")
    lines += ["", "Paper (8x B200, SANA / FLUX.1 / SD3.5-L rollout): 1.41x / 2.33x / 2.41x."]
    lines += explorer_step_section(policy, prompts, sessions, args.step_batch, args.step_repeats, args.threads)
    lines += int8_width_section(policy, [int(w) for w in args.widths.split(",") if w], args.step_batch,
                                args.step_repeats, args.threads)
    lines += slice_table(args)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


def interleaved_times(cases: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each case: one warm-up round (prompt encodings, kernels), then `repeats`
    rounds calling the cases in turn, so machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


# --- Real-width slices --------------------------------------------------------------------------
def add_slice_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--families", default="sana,flux,sd3", help="real-width slices to time ('' for none)")
    ap.add_argument("--slice-prompts", type=int, default=2)
    ap.add_argument("--slice-pool", type=int, default=8, help="N (K = N / 4)")
    ap.add_argument("--slice-full-steps", type=int, default=5, help="F (D = 0.6 F)")


# Image side per family: SANA 24 px -> 144 tokens, FLUX.1 32 px -> 64 + 8 text, SD3.5 32 px -> 16 + 85 text
# (its CLIP encoders always give 77 tokens); with the slices' 2x VAEs.
SLICE_RESOLUTION = {"sana": 24, "flux": 32, "sd3": 32}


def slice_rollouts(family: str, args) -> tuple[dict[str, list[float]], int]:
    """Seconds per rollout, interleaved: naive full precision vs Sol-RL with each explorer; and the
    slice's transformer parameter count."""
    from solrl_core.models.published import parameter_count
    from solrl_core.models.slices import ONE_BLOCK, build_slice

    side = SLICE_RESOLUTION[family]
    policy = build_slice(family, depth=ONE_BLOCK[family], resolution=(side, side))
    reward = load_weighted_reward("jpeg_compressibility")
    prompts = load_prompts("shapes_all")
    pool, keep = args.slice_pool, max(1, args.slice_pool // 4)
    full, draft = args.slice_full_steps, max(1, round(0.6 * args.slice_full_steps))
    tmp = Path(tempfile.mkdtemp())
    sessions = {}
    for backend in ("none", *EXPLORERS):
        session = TrainingSession(tmp / backend, policy, prompts, SessionConfig(lora_rank=8, lora_alpha=8.0))
        session.refresh_copies(RequantizeSettings(backend))  # the family's preset: real thresholds
        sessions[backend] = session
    kept_settings = SelectSettings(keep=keep)
    regen_settings = RegenerateSettings(full, batch_size=keep * args.slice_prompts)

    def naive() -> None:
        select(explore(sessions["none"], reward, ExploreSettings(args.slice_prompts, pool, full, "full", pool)),
               kept_settings)

    def sol_rl(backend: str):
        def run() -> None:
            s = sessions[backend]
            kept = select(explore(s, reward, ExploreSettings(args.slice_prompts, pool, draft, "low", pool)),
                          kept_settings)
            regenerate(kept, reward, regen_settings)
        return run

    cases = {"naive": naive, **{b: sol_rl(b) for b in EXPLORERS}}
    return interleaved_times(cases, args.repeats), parameter_count(policy.transformer)


def slice_table(args) -> list[str]:
    families = [f for f in args.families.split(",") if f]
    if not families:
        return []
    pool, full = args.slice_pool, args.slice_full_steps
    lines = ["", "## Real-width slices", "",
             "Random-weight one-block slices of the published transformers (real widths, heads and explorer "
             f"layers; FLUX.1 a single-stream block), {', '.join(f'{f} {SLICE_RESOLUTION[f]} px' for f in families)}, "
             f"P={args.slice_prompts}, N={pool}, K={max(1, pool // 4)}, D={max(1, round(0.6 * full))}, F={full} "
             f"(the paper's N/K = 4 and D/F = 0.6), {args.threads} threads, median of {args.repeats} interleaved "
             "repeats. Rollout = sampling + decoding + scoring (weight-free JPEG reward) + selection "
             "(+ regeneration).", "",
             "| family | slice parameters | naive s | "
             + " | ".join(f"Sol-RL {EXPLORER_LABELS[b]} s | speed-up" for b in EXPLORERS) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(EXPLORERS)]
    for family in families:
        times, params = slice_rollouts(family, args)
        naive = statistics.median(times["naive"])
        cells = [f"{t:.2f} | {naive / t:.2f}x" for t in (statistics.median(times[b]) for b in EXPLORERS)]
        lines.append(f"| {family} | {params / 1e6:.0f} M | {naive:.2f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


# --- one model step: explorer vs full precision -------------------------------------------------------

STEP_TARGETS = {"emulated": "cost <= 1.3x", "cpu_int8": "speed-up >= 1.5x"}


def _quantizable_layer_seconds(model: nn.Module, step, repeats: int = 3) -> float:
    """Median seconds per step spent inside the layers the explorer quantizes (or their full-precision
    originals): forward hooks on quantized layers, linears and 1x1 convolutions inside the blocks."""
    spent, starts = [0.0], {}

    def pre(module, args):
        starts[id(module)] = time.perf_counter()

    def post(module, args, out):
        spent[0] += time.perf_counter() - starts.pop(id(module))

    targets = [m for n, m in model.named_modules() if ".attn" in n or ".ff." in n]
    targets = [m for m in targets if isinstance(m, (QuantizedLayer, nn.Linear))
               or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    handles = [h for m in targets for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    samples = []
    try:
        for _ in range(repeats):
            spent[0] = 0.0
            step(model)
            samples.append(spent[0])
    finally:
        for h in handles:
            h.remove()
    return statistics.median(samples)


def explorer_step_section(policy, prompts: list[str], sessions: dict, batch: int, repeats: int,
                          threads: int) -> list[str]:
    """One Euler step's model call for `batch` images: full precision vs each explorer, interleaved."""
    backends = ("none", *EXPLORERS)
    models = {"full precision (fp32)": sessions["none"].copies.regenerator,
              **{f"{EXPLORER_LABELS[b]} explorer": sessions[b].copies.explorer for b in EXPLORERS}}
    cond = policy.encode([prompts[i % len(prompts)] for i in range(batch)])
    x = policy.initial_noise(list(range(batch)))
    sigma = torch.full((batch,), 0.75)

    def step(model: nn.Module) -> None:
        with torch.no_grad():
            policy.velocity(model, x, sigma, cond)

    load_before = os.getloadavg()[0]
    times = interleaved_times({name: (lambda m=model: step(m)) for name, model in models.items()}, repeats)
    load = (load_before + os.getloadavg()[0]) / 2
    inside = {name: _quantizable_layer_seconds(model, step) for name, model in models.items()}
    base = statistics.median(times["full precision (fp32)"])
    lines = [
        "",
        "## One model step: explorer vs full precision (embedded model)",
        "",
        f"One call of the embedded model on {batch} images (one Euler step), {threads} threads, median of "
        f"{repeats} interleaved repeats after a warm-up; 1-minute load average during the run {load:.1f} on "
        f"{os.cpu_count()} cores. The explorers are the ones benchmarks/convergence.py trains with ("
        "16x16 weight tiles, dequantized weights cached): emulated NVFP4 with the quickstart's min_dim 128 (the "
        "feed-forward convolutions and cross-attention key / value, 16 layers), cpu_int8 with min_dim 0 (every "
        "linear and 1x1 convolution of the blocks but self-attention q / k / v, 28 layers), cpu_bf16 (where "
        "the CPU has native bf16) the whole copy in bf16, as in benchmarks/convergence.py. "
        "'In quantizable layers' is measured in a separate hooked pass: the rest of the step (depthwise "
        "convolutions, SiLU gates, linear attention, norms, embedders) is the same full-precision work in "
        "the fp32, emulated and cpu_int8 rows; cpu_bf16 runs it in bf16 too.",
        "",
        "| model step | median ms | cost vs fp32 | speed-up vs fp32 | in quantizable layers, ms | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, backend in zip(models, backends):
        med = statistics.median(times[name])
        lines.append(f"| {name} | {1000 * med:.1f} | {med / base:.2f}x | {base / med:.2f}x | "
                     f"{1000 * inside[name]:.1f} | {STEP_TARGETS.get(backend, '')} |")
    bound = base / max(base - inside["full precision (fp32)"], 1e-9)
    lines += ["", f"Were the quantizable layers free, an fp32 step would be {bound:.2f}x faster: the most an "
              "explorer that replaces only those layers (emulated NVFP4, cpu_int8) can gain on this model. "
              "cpu_bf16 also runs the rest of the step in bf16."]
    return lines


def int8_width_section(policy, widths: list[int], batch: int, repeats: int, threads: int) -> list[str]:
    """cpu_int8 against fp32 for one step of random-weight transformers of the embedded model's config at
    wider widths (same depth, tokens, head size and explorer layers): would a wider embedded model let
    cpu_int8 reach its 1.5x step target? Its weights are capped at 20 MB."""
    if not widths:
        return []
    import copy

    from solrl_core.models.published import parameter_count
    from solrl_core.quant.model import QuantConfig, quantize_model

    base_config = dict(policy.transformer.config)
    head_dim = base_config["attention_head_dim"]
    side = base_config["sample_size"]
    tokens = (side // base_config["patch_size"]) ** 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, base_config["in_channels"], side, side, generator=generator)
    text = torch.randn(batch, policy.max_sequence_length, base_config["caption_channels"], generator=generator)
    mask = torch.ones(batch, policy.max_sequence_length)
    timestep = torch.full((batch,), 750.0)
    layers = QuantConfig.for_family(policy.family, EMBEDDED_MIN_DIM["cpu_int8"])  # as the session builds it

    def step(model: nn.Module) -> None:
        with torch.no_grad():
            model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=timestep)

    lines = ["", "## cpu_int8 at wider widths (the embedded model's config, random weights)", "",
             f"One call on {batch} images of a random-weight transformer with the embedded model's config "
             f"({base_config['num_layers']} blocks, {head_dim}-wide heads, {tokens} tokens per image) at each width, fp32 against the cpu_int8 explorer with the "
             f"same layers as above, {threads} threads, median of {repeats} interleaved repeats. The shipped "
             "weights are capped at 20 MB; fp32 bytes are 4 per parameter (2 if shipped in bf16).", "",
             "| width | parameters | fp32 MB | fp32 ms | cpu_int8 ms | cpu_int8 speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for width in widths:
        heads = width // head_dim
        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        config.update(num_attention_heads=heads, num_cross_attention_heads=heads, cross_attention_dim=width)
        torch.manual_seed(width)
        full = type(policy.transformer)(**config).eval()
        explorer = copy.deepcopy(full)
        quantize_model(explorer, layers, backend="cpu_int8")
        times = interleaved_times({"fp32": lambda m=full: step(m), "cpu_int8": lambda m=explorer: step(m)}, repeats)
        fp32, int8 = statistics.median(times["fp32"]), statistics.median(times["cpu_int8"])
        params = parameter_count(full)
        lines.append(f"| {width} | {params / 1e6:.2f} M | {4 * params / 1e6:.0f} | {1000 * fp32:.1f} | "
                     f"{1000 * int8:.1f} | {fp32 / int8:.2f}x |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
