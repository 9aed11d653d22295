"""Memory switches: what each saves and what it costs in time, measured on the CPU, and what fits a GPU
according to the memory plan.

    python benchmarks/memory.py [--threads 2] [--repeats 3] [--skip-measure] [--skip-plan]

Measured: a random-weight real-width slice of SANA-1600M (4 of its 20 blocks at width 2240, so that
checkpointing has blocks to drop; 16 px through the slice's 2x VAE: 64 image tokens), LoRA rank 32,
fp32, through the product's stage functions. For each switch the default and the switched run are
interleaved in every repeat (medians, fixed threads). Memory is the growth of the process's resident
memory (large blocks from mmap, so freed memory leaves at once) while the stage runs, or, where the
switch changes what stays allocated, the bytes of the live tensors it holds. Offloading cannot lower
memory on a machine whose "device" is its CPU: its row times the bookkeeping on the embedded model (a
whole iteration) and the plan gives its effect.

Planned: the bundled FLUX.1-dev and SD3.5-Large workflows at the paper's settings (P=48 over 8 ranks,
N=96, K=24, micro-batch 8, sampling batch 32, rewards PickScore + HPSv2 + CLIPScore), bf16, with each
switch set on its node, as `python -m solrl_core.run WORKFLOW --plan --world-size 8` computes it.
Writes benchmarks/results/memory.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout import interleaved_times  # noqa: E402

from solrl_core.graph.workflow import load_workflow  # noqa: E402
from solrl_core.plan import GIB  # noqa: E402
from solrl_core.plan.measure import mmap_allocations, rss_growth  # noqa: E402
from solrl_core.plan.workflow import plan_workflow  # noqa: E402
from solrl_core.rewards import load_weighted_reward  # noqa: E402
from solrl_core.train import settings as st  # noqa: E402
from solrl_core.train.optimizers import state_bytes  # noqa: E402
from solrl_core.train.samples import SampleBatch  # noqa: E402
from solrl_core.train.session import TrainingSession  # noqa: E402
from solrl_core.train.stages import explore, regenerate, select, update  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.md"
PROMPTS = ["a red circle", "two blue squares"]  # shapes-reward prompts (the embedded row scores them)
MIB = 2**20


# --- measured on the CPU ---------------------------------------------------------------------
def _slice():
    from solrl_core.models.slices import build_slice

    return build_slice("sana", depth={"num_layers": 4}, resolution=(16, 16))


class _Sessions:
    """Sessions on one slice (they share its weights; each keeps its own optimizer and copies)."""

    def __init__(self, policy):
        self.policy, self.root = policy, Path(tempfile.mkdtemp())

    def __call__(self, name: str, **settings) -> TrainingSession:
        config = st.SessionConfig(lora_rank=32, lora_alpha=64.0, **settings)
        return TrainingSession(self.root / name, self.policy, PROMPTS, config)


def _kept(session, prompts: int = 1, samples: int = 2, steps: int = 3) -> SampleBatch:
    """`prompts` x `samples` regenerated latents with distinct rewards (what NFT Update receives)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(prompts, samples, *session.policy.latent_shape(), generator=g)
    seeds = torch.arange(prompts * samples).reshape(prompts, samples)
    rewards = torch.linspace(0, 1, prompts * samples).reshape(prompts, samples)
    return SampleBatch(session, list(PROMPTS[:prompts]), seeds, latents, rewards, steps=steps,
                       prompt_ids=list(range(prompts)))


def _row(switch: str, what: str, memory: tuple[float, float] | None, times: dict[str, list[float]], a: str,
         b: str) -> str:
    """A table row; memory None: not measurable on a CPU (the plan gives it)."""
    ta, tb = statistics.median(times[a]), statistics.median(times[b])
    held = "— (see the plan)" if memory is None else f"{memory[0]:.1f} → {memory[1]:.1f} MiB"
    ratio = "—" if memory is None else f"{memory[1] / memory[0]:.2f}"
    return f"| {switch} | {what} | {held} | {ratio} | {ta:.2f} → {tb:.2f} | {tb / ta:.2f} |"


def update_rows(sessions: _Sessions, repeats: int) -> list[str]:
    """NFT update of 2 samples (micro-batch 2, one timestep): default, checkpointed, 8-bit AdamW."""
    settings = {"default": st.UpdateSettings(lr=1e-4, micro_batch=2),
                "gradient_checkpointing": st.UpdateSettings(lr=1e-4, micro_batch=2, gradient_checkpointing=True),
                "adamw8bit": st.UpdateSettings(lr=1e-4, micro_batch=2, optimizer="adamw8bit")}
    runs = {}
    for name, s in settings.items():
        session = sessions(f"update-{name}")
        batch = _kept(session)
        runs[name] = (session, lambda b=batch, s=s: update(b, s))
    cases = {name: fn for name, (_, fn) in runs.items()}
    times = interleaved_times(cases, repeats)  # the warm-up round compiles torchao's step
    peak = {name: rss_growth(fn) / MIB for name, fn in cases.items()}
    held = {name: state_bytes(session.optimizer) / MIB for name, (session, _) in runs.items()}
    # The 8-bit moments change what stays allocated between steps, not a step's transient peak
    # (activations and gradients), so its row gives the state held.
    return [_row("gradient checkpointing", "NFT update, 2 samples, micro-batch 2: peak growth of resident memory",
                 (peak["default"], peak["gradient_checkpointing"]), times, "default", "gradient_checkpointing"),
            _row("8-bit AdamW (torchao, compiled)", "AdamW state held between steps (bytes of its live tensors); "
                 "time: the same NFT update", (held["default"], held["adamw8bit"]), times, "default", "adamw8bit")]


def regenerator_rows(sessions: _Sessions, repeats: int) -> list[str]:
    """Requantize (no explorer) + regenerating 2 samples in 3 steps, per iteration."""
    reward = load_weighted_reward("jpeg_compressibility")
    growth, cases = {}, {}
    for mode in ("merged_copy", "adapter"):
        session = sessions(f"regen-{mode}")
        s = st.RequantizeSettings(backend="none", regenerator=mode)
        batch = _kept(session)

        def iteration(session=session, s=s, batch=batch):
            session.iteration += 1  # a new iteration: the merged copy is refreshed, as after an update
            session.refresh_copies(s)
            regenerate(batch, reward, st.RegenerateSettings(steps=3, batch_size=2))

        growth[mode] = rss_growth(iteration) / MIB  # the first one builds the merged copy
        cases[mode] = iteration
    times = interleaved_times(cases, repeats)
    return [_row("regenerate through the sampling adapter",
                 "memory: peak growth of resident memory over the first Requantize + regeneration (the merged "
                 "copy is built); time: one iteration's Requantize (merge) + regeneration of 2 samples in 3 steps",
                 (growth["merged_copy"], growth["adapter"]), times, "merged_copy", "adapter")]


def offload_rows(sessions: _Sessions, repeats: int) -> list[str]:
    """A whole iteration of the embedded model (requantize, explore 2 x 16 drafts in 4 steps, keep 8,
    regenerate in 8, update), with its shapes reward."""
    from solrl_core.models import load_policy

    embedded = _Sessions(load_policy("embedded"))
    reward = load_weighted_reward("shapes")
    cases = {}
    for name, on in (("off", False), ("on", True)):
        session = embedded(f"offload-{name}", offload_frozen=on)

        def iteration(session=session):
            session.refresh_copies(st.RequantizeSettings(backend="emulated", min_dim=0))
            drafts = explore(session, reward, st.ExploreSettings(prompts_per_iteration=2, candidates=16, steps=4,
                                                              batch_size=32))
            kept = regenerate(select(drafts, st.SelectSettings(keep=8)), reward,
                              st.RegenerateSettings(steps=8, batch_size=16))
            update(kept, st.UpdateSettings(lr=1e-4, micro_batch=16))
            session.iteration += 1

        cases[name] = iteration
    times = interleaved_times(cases, repeats)
    # On a CPU the "device" and the host are one memory: parking moves nothing, so only the bookkeeping
    # is timed here; on a GPU each park / fetch is a host-device copy of the part's weights.
    return [_row("offload frozen parts (embedded model)", "one whole iteration (requantize, explore 2 x 16, "
                 "regenerate 8, update): the offloading bookkeeping only", None, times, "off", "on")]


def measured_table(threads: int, repeats: int) -> list[str]:
    torch.set_num_threads(threads)
    policy = _slice()
    sessions = _Sessions(policy)
    lines = ["| switch | what is measured | memory: default → switch | memory ratio | time (median s): default → "
             "switch | time ratio |", "|---|---|---:|---:|---:|---:|"]
    with mmap_allocations():
        for rows in (update_rows, regenerator_rows, offload_rows):
            for line in rows(sessions, repeats):
                lines.append(line)
                print(line, flush=True)
    return lines


# --- planned ------------------------------------------------------------------------------------
CHECKPOINTING = {"SolRLNFTUpdate.gradient_checkpointing": True}
OFFLOAD = {"SolRLTrainingRun.offload_frozen": True}
ADAPTER = {"SolRLRequantize.regenerator": "adapter"}
ADAMW8BIT = {"SolRLNFTUpdate.optimizer": "adamw8bit"}
SWITCHES = {**CHECKPOINTING, **OFFLOAD, **ADAPTER, **ADAMW8BIT}
SMALL_BATCHES = {"SolRLNFTUpdate.micro_batch": 1, "SolRLFP4Sampler.batch_size": 4,
                 "SolRLBF16Regenerator.batch_size": 4}
PLAN_ROWS = [
    ("paper settings (defaults)", {}),
    ("+ gradient checkpointing", CHECKPOINTING),
    ("+ offload frozen parts", OFFLOAD),
    ("+ regenerate through the adapter", ADAPTER),
    ("+ 8-bit AdamW", ADAMW8BIT),
    ("gradient checkpointing + offload", {**CHECKPOINTING, **OFFLOAD}),
    ("gradient checkpointing + adapter regenerator", {**CHECKPOINTING, **ADAPTER}),
    ("gradient checkpointing + offload + adapter regenerator", {**CHECKPOINTING, **OFFLOAD, **ADAPTER}),
    ("all four switches", SWITCHES),
    ("all four, micro-batch 1, sampling batches 4", {**SWITCHES, **SMALL_BATCHES}),
    ("all four, micro-batch 1, sampling batches 4, no explorer (stage 1 at full precision: not Sol-RL)",
     {**SWITCHES, **SMALL_BATCHES, "SolRLRequantize.backend": "none", "SolRLFP4Sampler.precision": "full"}),
]
MODELS = {"FLUX.1-dev": "sol_rl_flux1", "SD3.5-Large": "sol_rl_sd35"}


def _set(api: dict, values: dict) -> dict:
    for key, value in values.items():
        class_type, name = key.split(".")
        for entry in api.values():
            if entry["class_type"] == class_type:
                entry["inputs"][name] = value
    return api


def plan_table(world_size: int = 8) -> list[str]:
    lines = ["| model | settings | peak stage | peak GiB | fits 80 GiB | fits 24 GiB | largest parts at the peak (GiB) |",
             "|---|---|---|---:|---|---|---|"]
    for model, workflow in MODELS.items():
        path = ROOT / "workflows" / f"{workflow}.json"
        for label, values in PLAN_ROWS:
            api, _ = load_workflow(str(path))
            plan = plan_workflow(_set(api, values), str(path), 80, world_size)
            top = sorted(plan.components.items(), key=lambda kv: -kv[1])[:4]
            parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in top)
            peak = plan.peak_bytes / GIB
            px = "x".join(map(str, plan.resolution))
            lines.append(f"| {model} {px} | {label} | {plan.peak_stage} | {peak:.1f} | {'yes' if peak <= 80 else 'no'} | "
                         f"{'yes' if peak <= 24 else 'no'} | {parts} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    lines = ["# Memory switches", "", "`python benchmarks/memory.py` (see its docstring for what is measured).", ""]
    if not args.skip_measure:
        load = os.getloadavg()[0]
        table = measured_table(args.threads, args.repeats)
        lines += ["## Measured on the CPU: SANA-1600M real-width slice (4 blocks), offloading on the embedded model",
                  "", f"{args.threads} thread(s), {args.repeats} interleaved repeats after a warm-up round, medians. "
                  f"1-minute load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, on a machine with "
                  f"{os.cpu_count()} cores (above the thread count: measured under load, so times are noisy; "
                  "the ratios pair runs made under the same load). Memory ratio < 1: the switch saves; "
                  "time ratio > 1: it costs.", "", *table]
    if not args.skip_plan:
        lines += ["", "## What fits, according to the plan (LoRA r32, bf16, 8 ranks)", "",
                  "Each GPU's peak over the stages of one iteration, including 1 GiB reserved for the CUDA "
                  "context and allocator (`--plan` adds it); fp32 trained weights, EMA and AdamW moments.", "",
                  *plan_table()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
