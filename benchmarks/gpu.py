"""GPU checks in one script: explorer layers, rollout throughput, peak memory against the plan.

    python benchmarks/gpu.py [--out DIR] [--budget-s 420]
    python benchmarks/gpu.py --dry-run [--out DIR]      # every section, tiny, on the CPU (in the test suite)

Made for a short slot on one H100 / H200-class GPU with no network: it needs torch, transformers, peft
and diffusers (this project as source, `PYTHONPATH=.`), and uses Transformer Engine and torchao when
they import. Random weights throughout: no downloads.
(a) explorer layers: Transformer Engine FP8 (Hopper) / NVFP4 (Blackwell) and torchao FP8 against the
    emulated NVFP4 reference and the bf16 product on real-width layers of each family's preset:
    relative errors, and NVFP4 quantization bit for bit against TE's quantizer where TE has it;
(b) rollout throughput: full-size SANA-1.6B and FLUX.1-dev transformers, one sampling step, bf16
    against the low-precision explorer (backend auto), at 512 and 1024 px;
(c) one Sol-RL iteration at full size (the FLUX.1 transformer, small text encoders of the real
    widths, a weight-free reward): peak allocated memory against the memory plan's estimate.
Writes gpu.json and gpu.md; without CUDA (and without --dry-run) it says so and writes nothing.
Sections that would overrun --budget-s are skipped and recorded as such.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.models.loading import policy_from_components  # noqa: E402
from solrl_core.models.published import (  # noqa: E402
    build_component,
    build_scheduler,
    component_config,
    published_folder,
)
from solrl_core.quant import NVFP4Linear, QuantConfig, quantize, quantize_model, select_backend  # noqa: E402
from solrl_core.quant.layers import make_quantized_layer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Real-width layers of each preset, (name, out, in): the widest and a typical one per family.
LAYERS = {
    "sana": [("ff.conv_inverted", 11200, 2240), ("attn2.to_k", 2240, 2240)],
    "flux": [("single.proj_out", 3072, 15360), ("ff.net.0.proj", 12288, 3072)],
    "sd3": [("ff.net.0.proj", 9728, 2432), ("ff.net.2", 2432, 9728)],
}
# Dry run: the same code at tiny widths (text-encoder outputs keep their real widths).
DRY_WIDTHS = {
    "sana": {"num_attention_heads": 2, "attention_head_dim": 16, "num_cross_attention_heads": 2,
             "cross_attention_head_dim": 16, "cross_attention_dim": 32},
    "flux": {"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)},
    "sd3": {"num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32},
}


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    dry: bool
    deadline: float
    records: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- (a) explorer layers ------------------------------------------------------------------------
def _torchao_fp8(linear: torch.nn.Linear):
    """A torchao FP8 (dynamic activation + weight) copy of `linear`, or the reason there is none."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return None, f"torchao FP8 does not import: {type(e).__name__}"
    layer = copy.deepcopy(linear)
    try:
        quantize_(layer, Float8DynamicActivationFloat8WeightConfig())
    except Exception as e:  # noqa: BLE001
        return None, f"torchao FP8 refused: {type(e).__name__}: {e}"[:200]
    return layer, ""


def _te_nvfp4_bits(w: torch.Tensor, tile: tuple[int, int]):
    """Transformer Engine's own NVFP4 quantization of `w` (packed bytes, scale bytes, amax), or a reason."""
    try:
        import transformer_engine.pytorch as te
        import transformer_engine_torch as tex
        from transformer_engine.pytorch import NVFP4Quantizer
    except Exception as e:  # noqa: BLE001
        return None, f"Transformer Engine NVFP4 quantizer unavailable: {type(e).__name__}"
    available = getattr(te, "is_nvfp4_available", lambda: False)()
    if not available:
        return None, "this GPU / TE build has no NVFP4"
    q = NVFP4Quantizer(fp4_dtype=tex.DType.kFloat4E2M1, rowwise=True, columnwise=False, with_amax_reduction=False,
                       amax_reduction_group=None, with_rht=False, with_post_rht_amax=False,
                       with_2d_quantization=tile == (16, 16))(w)
    return (q._rowwise_data.view(torch.uint8), q._rowwise_scale_inv.view(torch.uint8), q._amax_rowwise), ""


def explorer_layers(setup: Setup) -> list[dict]:
    rows = []
    tokens = 64 if setup.dry else 4096
    backends = ["emulated", "cpu_int8"] if setup.device.type == "cpu" else []
    if setup.device.type == "cuda":
        for name in ("te_fp8", "te_nvfp4"):
            with suppress(ValueError):
                backends.append(select_backend(name, setup.device).name)
    for family, layers in LAYERS.items():
        for name, out_f, in_f in layers:
            if setup.dry:
                out_f, in_f = max(16, out_f // 64 // 16 * 16), max(16, in_f // 64 // 16 * 16)
            torch.manual_seed(0)
            lin = torch.nn.Linear(in_f, out_f, device=setup.device, dtype=setup.dtype)
            x = torch.randn(tokens, in_f, device=setup.device, dtype=setup.dtype)
            with torch.no_grad():
                exact = lin(x)
                reference = NVFP4Linear(lin.weight, lin.bias, name, (16, 16))(x)
                row = {"family": family, "layer": name, "shape": [out_f, in_f], "tokens": tokens,
                       "emulated_vs_exact": _rel(reference, exact)}
                for backend in backends:
                    if backend == "emulated":
                        continue
                    layer = make_quantized_layer(backend, lin, name, (16, 16), False)
                    out = layer(x)
                    row[f"{backend}_vs_exact"] = _rel(out, exact)
                    row[f"{backend}_vs_emulated"] = _rel(out, reference)
                fp8, why = _torchao_fp8(lin) if setup.device.type == "cuda" else (None, "needs CUDA")
                if fp8 is not None:
                    out = fp8(x)
                    row["torchao_fp8_vs_exact"], row["torchao_fp8_vs_emulated"] = _rel(out, exact), _rel(out, reference)
                else:
                    row["torchao_fp8"] = why
                bits, why = _te_nvfp4_bits(lin.weight.detach(), (16, 16)) if setup.device.type == "cuda" \
                    else (None, "needs CUDA")
                if bits is not None:
                    ours = quantize(lin.weight.detach(), (16, 16))
                    packed, scales, amax = bits
                    rows_, cols = ours.block_scales.shape
                    row["nvfp4_bits_equal"] = bool(
                        torch.equal(packed, ours.packed)
                        and torch.equal(scales[:rows_, :cols], ours.block_scales.view(torch.uint8))
                        and torch.equal(amax.reshape(()).float(), ours.amax.reshape(()).float()))
                else:
                    row["nvfp4_bits"] = why
            rows.append(row)
    return rows


# --- (b) rollout throughput -------------------------------------------------------------------
def _transformer_policy(family: str, setup: Setup, resolution: int):
    """The family's adapter around a random-weight full-size transformer (no text encoders: the
    conditioning is given at its real shapes)."""
    folder = published_folder(family)
    overrides = DRY_WIDTHS[family] | {"num_layers": 1} | ({"num_single_layers": 1} if family == "flux" else {}) \
        if setup.dry else {}
    torch.manual_seed(0)
    components = {name: None for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    components["transformer"] = build_component(folder, "transformer", setup.device, setup.dtype, **overrides)
    if setup.dry:  # only the spatial factor matters here
        from solrl_core.models.slices import small_vae

        latent_channels = component_config(folder, "vae")["latent_channels"]
        components["vae"] = small_vae(folder, latent_channels).to(setup.device, setup.dtype)
    else:
        components["vae"] = build_component(folder, "vae", setup.device, setup.dtype)
    components["scheduler"] = build_scheduler(folder)
    settings = {"resolution": (resolution, resolution)}
    if family == "sana":
        settings["complex_human_instruction"] = ()
    return policy_from_components(family, components, setup.device, setup.dtype, f"random {family}", **settings)


def _step_speed(family: str, resolution: int, setup: Setup, batch: int, repeats: int) -> dict:
    from solrl_core.plan.activations import placeholder_conditioning

    policy = _transformer_policy(family, setup, resolution)
    config = QuantConfig.for_family(family, 0 if setup.dry else None)
    explorer = copy.deepcopy(policy.transformer).eval().requires_grad_(False)
    report = quantize_model(explorer, config, backend="cpu_int8" if setup.device.type == "cpu" else "auto")
    x = torch.randn(batch, *policy.latent_shape(), device=setup.device)
    sigma = torch.full((batch,), 0.5, device=setup.device)
    cond = placeholder_conditioning(policy, batch, setup.device)

    def step(model):
        def run():
            with torch.no_grad():
                policy.velocity(model, x, sigma, cond)
        return run

    full = _median_seconds(step(policy.transformer.eval()), setup.device, repeats)
    low = _median_seconds(step(explorer), setup.device, repeats)
    speedup = full / low
    return {"family": family, "resolution": resolution, "batch": batch, "backend": report.backend,
            "quantized_layers": len(report.quantized), "bf16_step_s": full, "explorer_step_s": low,
            "step_speedup": speedup,
            # the paper's 24-in-96 with D=6, F=10: naive 96 x 10 full steps against 96 x 6 explorer
            # steps + 24 x 10 full steps
            "rollout_speedup_at_paper_proportions": 960 / (576 / speedup + 240)}


def rollout_throughput(setup: Setup) -> list[dict]:
    rows = []
    batch, repeats = (2, 2) if setup.dry else (4, 5)
    for family in ("sana", "flux"):
        for resolution in ((64,) if setup.dry else (512, 1024)):
            if setup.left() < 60:
                rows.append({"family": family, "resolution": resolution, "skipped": "time budget"})
                continue
            rows.append(_step_speed(family, resolution, setup, batch, repeats))
            _free(setup.device)
    return rows


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- (c) one iteration against the plan --------------------------------------------------------
class _Brightness:
    """A weight-free reward on tensors: mean brightness (no PIL, no model)."""

    name = "brightness"

    def score(self, images, prompts):
        total = images.float().mean(dim=(1, 2, 3))
        return total, {self.name: total}


def iteration_memory(setup: Setup) -> dict:
    from solrl_core.models.published import write_config_folder
    from solrl_core.models.slices import slice_components
    from solrl_core.plan import IterationShape, MemorySettings, plan_memory
    from solrl_core.plan.measure import rss_growth
    from solrl_core.train import settings as st
    from solrl_core.train.session import TrainingSession
    from solrl_core.train.stages import explore, regenerate, select, update

    if setup.left() < 120:
        return {"skipped": "time budget"}
    family = "flux"
    folder = published_folder(family)
    depth = (DRY_WIDTHS[family] | {"num_layers": 1, "num_single_layers": 1}) if setup.dry else \
        {k: component_config(folder, "transformer")[k] for k in ("num_layers", "num_single_layers")}
    # The slices' VAE downsamples 2x where FLUX.1's does 8x: 128 px gives FLUX.1-at-512 px's 1024 tokens.
    resolution = 32 if setup.dry else 128
    components = slice_components(family, depth=depth, device=setup.device, dtype=setup.dtype)
    configs = write_config_folder(components, Path(tempfile.mkdtemp()) / "pipeline",
                                  json.loads((folder / "model_index.json").read_text())["_class_name"])
    policy = policy_from_components(family, components, setup.device, setup.dtype, "random flux",
                                    resolution=(resolution, resolution), max_sequence_length=64)
    shape = IterationShape(prompts=1, candidates=8, keep=2, draft_steps=2, full_steps=2, explore_batch=8,
                           regen_batch=2, micro_batch=2, backend="auto", min_dim=0 if setup.dry else None,
                           distinct_prompts=1)
    prompts = ["a red circle on a blue square"]
    reward = _Brightness()

    def iteration():
        session = TrainingSession(Path(tempfile.mkdtemp()), policy, prompts, st.SessionConfig())
        backend = "cpu_int8" if setup.device.type == "cpu" else "auto"
        copies = session.refresh_copies(st.RequantizeSettings(backend, min_dim=0 if setup.dry else -1))
        drafts = explore(session, reward, st.ExploreSettings(1, shape.candidates, shape.draft_steps, "low",
                                                          shape.explore_batch))
        kept = select(drafts, st.SelectSettings(keep=shape.keep))
        samples = regenerate(kept, reward, st.RegenerateSettings(shape.full_steps, batch_size=shape.regen_batch))
        session.commit(update(samples, st.UpdateSettings(micro_batch=shape.micro_batch)))
        return copies.backend

    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
        backend = iteration()
        measured = torch.cuda.max_memory_allocated(setup.device)
        reserved = torch.cuda.max_memory_reserved(setup.device)
    else:
        box = {}
        measured = rss_growth(lambda: box.setdefault("backend", iteration()))
        measured += sum(p.numel() * p.element_size() for m in components.values()
                        if isinstance(m, torch.nn.Module) for p in m.parameters())  # weights predate the measure
        backend, reserved = box["backend"], None
    settings = MemorySettings(dtype=setup.dtype, explorer_backend=backend, reserve_bytes=0,
                              cache_dequantized=True)
    shape = IterationShape(**{**shape.__dict__, "backend": backend})
    plan = plan_memory(configs, family, shape, settings, source="random-weight FLUX.1 (small text encoders)",
                       policy_settings={"resolution": (resolution, resolution), "max_sequence_length": 64})
    return {"backend": backend, "resolution": resolution, "measured_peak_bytes": measured,
            "measured_reserved_bytes": reserved, "planned_peak_bytes": plan.peak_bytes,
            "planned_peak_stage": plan.peak_stage, "ratio": plan.peak_bytes / measured,
            "planned_components": plan.components}


# --- report -------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    gib = 2**30
    lines = [f"# GPU checks ({result['device']})", "", f"`python benchmarks/gpu.py{' --dry-run' if result['dry_run'] else ''}`"
             f", {result['seconds']:.0f} s.", "", "## (a) Explorer layers against the emulated NVFP4 reference", "",
             "| family | layer | shape | emulated vs bf16 | backend vs bf16 | backend vs emulated | NVFP4 bits |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in result["explorer_layers"]:
        others = [k[:-9] for k in r if k.endswith("_vs_exact") and not k.startswith("emulated")]
        for b in others or ["-"]:
            lines.append(f"| {r['family']} | {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | "
                         f"{r['emulated_vs_exact']:.4f} | {b}: {r.get(b + '_vs_exact', float('nan')):.4f} | "
                         f"{r.get(b + '_vs_emulated', float('nan')):.4f} | "
                         f"{r.get('nvfp4_bits_equal', r.get('nvfp4_bits', '-'))} |")
    lines += ["", "## (b) One sampling step: bf16 against the explorer", "",
              "| family | px | batch | backend | layers | bf16 s | explorer s | step speed-up | rollout speed-up at 24-in-96, D/F 6/10 |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rollout"]:
        if "skipped" in r:
            lines.append(f"| {r['family']} | {r['resolution']} | skipped: {r['skipped']} |||||||")
            continue
        lines.append(f"| {r['family']} | {r['resolution']} | {r['batch']} | {r['backend']} | {r['quantized_layers']} | "
                     f"{r['bf16_step_s']:.3f} | {r['explorer_step_s']:.3f} | {r['step_speedup']:.2f}x | "
                     f"{r['rollout_speedup_at_paper_proportions']:.2f}x |")
    it = result["iteration"]
    lines += ["", "## (c) One Sol-RL iteration: measured peak against the plan", ""]
    if "skipped" in it:
        lines.append(f"skipped: {it['skipped']}")
    else:
        lines.append(f"FLUX.1 transformer, explorer `{it['backend']}`, {it['resolution']} px: measured peak "
                     f"{it['measured_peak_bytes'] / gib:.2f} GiB, planned {it['planned_peak_bytes'] / gib:.2f} GiB "
                     f"(stage {it['planned_peak_stage']}), plan / measured = {it['ratio']:.2f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every section, tiny, on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here, nothing measured (use --dry-run to exercise the code on the CPU)")
        return 0
    start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    setup = Setup(device, torch.float32 if args.dry_run else torch.bfloat16, args.dry_run, start + args.budget_s)
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    result = {"device": name, "dry_run": args.dry_run, "torch": torch.__version__}
    result["explorer_layers"] = explorer_layers(setup)
    result["rollout"] = rollout_throughput(setup)
    result["iteration"] = iteration_memory(setup)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(math.isfinite(r.get("emulated_vs_exact", 0.0)) for r in result["explorer_layers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
