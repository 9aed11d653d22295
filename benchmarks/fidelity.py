"""Ranking fidelity: does the low-precision explorer rank a prompt's drafts as full precision does?

    python benchmarks/fidelity.py [--prompts shapes_count] [--groups 45] [--pool 32] [--threads 2]

For each prompt group of N seeds the embedded model samples the same seeds (same noise) with the
full-precision policy at F steps (the reference) and with each explorer: emulated NVFP4, `cpu_int8`
and (on CPUs with native bf16) `cpu_bf16`, at D = F and at D < F, plus full precision at D steps
(what fewer steps alone cost).
All of them run through the product's FP4 Sampler stage and are scored by the `shapes` reward. Per
group: Kendall tau-b, Spearman rho, top-k and bottom-k agreement (solrl_core.train.audit; a draft
tied with the reference's k-th counts as in), averaged over groups; and what selection keeps: the
reference reward of the proxy's top k against the true top k and the pool mean. Writes
benchmarks/results/fidelity.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from miniature import NVFP4_MIN_DIM, RESULTS, Task, write_table

from solrl_core.models import load_policy
from solrl_core.quant.backends import cpu_has_native_bf16
from solrl_core.rewards import load_weighted_reward
from solrl_core.train.audit import ranking_agreement
from solrl_core.train.prompts import load_prompts
from solrl_core.train.session import TrainingSession
from solrl_core.train.settings import ExploreSettings, RequantizeSettings, SessionConfig
from solrl_core.train.stages import explore


def _kept_reward(proxy: torch.Tensor, full: torch.Tensor, k: int) -> float:
    """Mean reference reward of the k drafts with the best proxy reward (ties to the earlier draft)."""
    picked = torch.argsort(-proxy.double(), dim=1, stable=True)[:, :k]
    return torch.gather(full, 1, picked).mean().item()


def main(argv: list[str] | None = None) -> None:
    task = Task()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=task.prompts)
    ap.add_argument("--groups", type=int, default=45, help="prompt groups (distinct prompts of the set)")
    ap.add_argument("--pool", type=int, default=task.pool, help="N drafts per group")
    ap.add_argument("--draft-steps", type=int, default=task.draft_steps, help="D")
    ap.add_argument("--full-steps", type=int, default=task.full_steps, help="F")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fidelity.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    d, f = a.draft_steps, a.full_steps
    policy = load_policy("embedded")
    reward = load_weighted_reward("shapes")
    prompts = load_prompts(a.prompts)
    ff, every = f"feed-forward (max(in, out) > {NVFP4_MIN_DIM})", "every linear"
    configs = [("full precision (reference)", "none", f, 0), ("full precision, fewer steps", "none", d, 0),
               (f"emulated NVFP4, {ff}", "emulated", f, NVFP4_MIN_DIM),
               (f"emulated NVFP4, {ff}", "emulated", d, NVFP4_MIN_DIM),
               (f"emulated NVFP4, {every}", "emulated", d, 0),
               (f"cpu_int8, {every}", "cpu_int8", f, 0), (f"cpu_int8, {every}", "cpu_int8", d, 0),
               (f"cpu_int8, {ff}", "cpu_int8", d, NVFP4_MIN_DIM)]
    if cpu_has_native_bf16():
        configs += [("cpu_bf16, the whole copy", "cpu_bf16", f, 0), ("cpu_bf16, the whole copy", "cpu_bf16", d, 0)]
    results = []
    with tempfile.TemporaryDirectory(prefix="solrl-fidelity-") as root:
        for i, (name, backend, steps, min_dim) in enumerate(configs):
            s = TrainingSession(Path(root) / str(i), policy, prompts,
                                SessionConfig(seed=a.seed, lora_rank=task.lora_rank, lora_alpha=task.lora_alpha),
                                resume=False)
            s.refresh_copies(RequantizeSettings(backend, min_dim=min_dim))
            start = time.perf_counter()
            batch = explore(s, reward, ExploreSettings(min(a.groups, len(prompts)), a.pool, steps,
                                                       "full" if backend == "none" else "low", 64))
            results.append((name, backend, steps, batch, time.perf_counter() - start))
            print(f"{name}, {steps} steps: mean reward {batch.rewards.mean():.4f} "
                  f"({results[-1][-1]:.1f} s)", flush=True)
    ref = results[0][3]
    for _, _, _, batch, _ in results[1:]:  # the same prompts and seeds in every configuration
        assert batch.prompts == ref.prompts and torch.equal(batch.seeds, ref.seeds)
    full = ref.rewards
    k = 4
    groups, n = full.shape
    lines = [
        "# Ranking fidelity of the explorer (embedded model, CPU)",
        "",
        f"`python benchmarks/fidelity.py`: {groups} prompt groups of `{a.prompts}` x N={n} seeds; the reference "
        f"is full precision at F={f} Euler steps; every configuration samples the same seeds through the FP4 "
        "Sampler stage and is scored by the `shapes` reward (partial credit). Per group, then averaged: Kendall "
        "tau-b and Spearman rho of the explorer's rewards against the reference's; top-k: share of the explorer's "
        "k best drafts that the reference also ranks in its k best (ties with the reference's k-th count as in); "
        f"bottom-k likewise for the worst. Selection keeps the {k} best and {k} worst per prompt (K=8). "
        f"Reference reward of the explorer's top {k}: what best_worst selection keeps, against the true top {k} "
        f"({_kept_reward(full, full, k):.4f}) and the pool mean ({full.mean():.4f}).",
        "",
        "| explorer (quantized layers) | steps | Kendall tau | Spearman rho | top-4 | top-8 | bottom-4 | reference reward of its top-4 "
        "| mean draft reward | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, steps, batch, seconds in results[1:]:
        r4 = ranking_agreement(batch.rewards, full, k=4)
        r8 = ranking_agreement(batch.rewards, full, k=8)
        lines.append(
            f"| {name} | {steps} | {r4['kendall']:.3f} | {r4['spearman']:.3f} | {100 * r4['top4_overlap']:.1f}% | "
            f"{100 * r8['top8_overlap']:.1f}% | {100 * r4['bottom4_overlap']:.1f}% | "
            f"{_kept_reward(batch.rewards, full, k):.4f} | {batch.rewards.mean():.4f} | {seconds:.1f} |")
    lines += ["", f"Reference ({f} steps, full precision): {results[0][4]:.1f} s. Paper (FP4 vs BF16, groups of 96 on "
              "FLUX.1): Kendall tau 0.798, Spearman rho 0.927, top-4 96.9% (top-8 95.0%), bottom-4 false inclusion "
              "3.9%.", f"{a.threads} threads; timings on a shared machine are indicative only."]
    write_table(a.out, lines)


if __name__ == "__main__":
    main()
