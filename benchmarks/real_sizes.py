"""Real model sizes: the explorer's layers, the memory plans of the paper workflows, and how close
the plan's activation traces come to memory measured on the CPU.

    python benchmarks/real_sizes.py [--skip-measure]

Writes benchmarks/results/real_sizes.md (the README shows it). Loads no weights except for the
measured real-width slices, which are random.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.graph.workflow import load_workflow  # noqa: E402
from solrl_core.models.published import build_component, published_folder  # noqa: E402
from solrl_core.plan import GIB, MemorySettings  # noqa: E402
from solrl_core.plan.workflow import plan_workflow  # noqa: E402
from solrl_core.quant import QuantConfig, quantized_weight_nbytes, select_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "real_sizes.md"
NAMES = {"sana": "SANA-1600M-1024px", "flux": "FLUX.1-dev", "sd3": "SD3.5-Large"}
WORKFLOWS = {"sana": "sol_rl_sana", "flux": "sol_rl_flux1", "sd3": "sol_rl_sd35"}


def layer_table() -> list[str]:
    """Per family: quantized layers and parameters, and what the explorer's quantized weights hold."""
    lines = ["| model | quantized layers | quantized parameters | bf16 | NVFP4 (format, checkpoint) | "
             "emulated explorer (NVFP4 + fp32 cache) | Transformer Engine explorer |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for family, name in NAMES.items():
        model = build_component(published_folder(family), "transformer")
        chosen, _ = select_layers(model, QuantConfig.for_family(family))
        shapes = [tuple(m.weight.reshape(m.weight.shape[0], -1).shape) for m in chosen.values()]
        params = sum(o * i for o, i in shapes)
        lines.append(f"| {name} | {len(chosen)} | {params / 1e9:.3f} B | {2 * params / GIB:.2f} GiB | "
                     f"{_held(shapes, 'emulated'):.2f} GiB | {_held(shapes, 'emulated', True):.2f} GiB | "
                     f"{_held(shapes, 'te_fp8'):.2f} GiB |")
    return lines


def _held(shapes: list[tuple[int, int]], backend: str, cache: bool = False) -> float:
    return sum(quantized_weight_nbytes(backend, o, i, cache_dequantized=cache) for o, i in shapes) / GIB


SWITCHES = {
    "today": MemorySettings(),
    "issue 12 switches (modelled)": MemorySettings(trained_dtype=torch.float32, gradient_checkpointing=True,
                                                   offload_frozen=True, regenerator="adapter"),
}


def plan_table(world_sizes=(8, 1)) -> list[str]:
    lines = ["| workflow | ranks | settings | peak stage | peak GiB | fits 80 GiB | largest parts at the peak (GiB) |",
             "|---|---:|---|---|---:|---|---|"]
    for workflow in WORKFLOWS.values():
        path = ROOT / "workflows" / f"{workflow}.json"
        api, _ = load_workflow(str(path))
        for world in world_sizes:
            for label, settings in SWITCHES.items():
                plan = plan_workflow(api, str(path), 80, world, replace(settings, world_size=world))
                top = sorted(plan.components.items(), key=lambda kv: -kv[1])[:4]
                parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in top)
                lines.append(f"| {workflow} | {world} | {label} | {plan.peak_stage} | {plan.peak_bytes / GIB:.1f} | "
                             f"{'yes' if plan.fits else 'no'} | {parts} |")
                print(lines[-1], flush=True)
    return lines


def measure_table(threads: int) -> list[str]:
    from solrl_core.plan.measure import run

    lines = ["| slice | code | measured on CPU (MiB) | traced (MiB) | traced / measured |", "|---|---|---:|---:|---:|"]
    for family in NAMES:
        for row in run(family, micro_batch=2, sample_batch=4, resolution=32, threads=threads):
            lines.append(f"| {NAMES[family]}, slice | {row.what} | {row.measured / 2**20:.1f} | "
                         f"{row.estimated / 2**20:.1f} | {row.ratio:.3f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-measure", action="store_true", help="leave out the CPU measurements (minutes)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads while measuring (more threads add per-thread kernel scratch to the "
                         "process, which is not part of a GPU's memory)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    lines = ["# Real model sizes", "", "`python benchmarks/real_sizes.py`", "",
             "## The explorer's layers (algorithm.md section 4 presets, published configs)", "", *layer_table(), "",
             "## Memory plans of the paper workflows (`--plan --gpu-memory 80`)", "",
             "bf16, the paper's P=48 / N=96 / K=24 / D=6 / F=10, micro-batch 8, sampling batch 32, rewards "
             "PickScore + HPSv2 + CLIPScore (fp32, as Load Reward builds them); 8 ranks as in the paper, and one. "
             "'today' is the product as it is; the second row models the switches issue 12 adds (fp32 trained "
             "weights, gradient checkpointing, offloading frozen parts, regenerating through the adapter).", "",
             *plan_table()]
    if not args.skip_measure:
        lines += ["", "## Traced activations against memory measured on the CPU", "",
                  "Real-width slices (random weights, one or two blocks, 32 px), fp32, one CPU thread: one sampling "
                  "step at batch 4 and one NFT-update pair at micro-batch 2 (`python -m solrl_core.plan.measure "
                  "FAMILY`); measured = growth of resident memory with large blocks served by mmap.", "",
                  *measure_table(args.threads)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
