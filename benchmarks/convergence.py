"""Convergence: Sol-RL against DiffusionNFT, naive scaling and naive quant, side by side on CPU.

    python benchmarks/convergence.py [--seed S] [--minutes M] [--json OUT] [--threads 2] [--report-only]

Five arms train the embedded model on the same task (benchmarks/miniature.py: count prompts, 15 of
them held out, the same prompts, seed, K, F and learning rate), interleaved one iteration each in
turn, each timing its own work: Sol-RL with the emulated NVFP4 explorer, Sol-RL with `cpu_int8`,
DiffusionNFT (K-in-K at full precision), naive scaling (K-in-N at full precision) and naive quant
(train on the NVFP4 drafts); on a CPU with native bf16 a sixth, Sol-RL with `cpu_bf16`. The held-out reward (prompts never trained on, fixed seeds) is measured
every few iterations, untimed. For each arm: the time to reach DiffusionNFT's final held-out
reward, as a ratio to DiffusionNFT's own (the paper's convergence speed-up, 2.42-4.64x on 8 B200s).

Writes benchmarks/results/convergence.md and .png (another --seed: convergence_seed<S>.*) and the
raw curves as convergence_seed<S>.json; the tables other than the timing columns depend only on the
seed. --minutes caps the wall time (the run stops after the round that would overrun it and says
so); the defaults finish in about 50 minutes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from miniature import RESULTS, Curve, Task, paper_arms, run_arms

BASELINE = "diffusionnft"


def speedups(curves: dict[str, Curve], cpu: bool = False) -> tuple[float, dict[str, float]]:
    """DiffusionNFT's final (smoothed) held-out reward, and per arm: DiffusionNFT's time to reach it
    divided by the arm's (0: the arm never reached it; NaN for all when DiffusionNFT did not improve
    on the base model, so there is no time to compare)."""
    base = curves[BASELINE]
    target = base.smoothed()[-1]
    t_base = base.time_to(target, cpu)
    if t_base <= 0:
        return target, {name: math.nan for name in curves}
    return target, {name: t_base / t if math.isfinite(t) else 0.0
                    for name, c in curves.items() for t in [c.time_to(target, cpu)]}


def ranking(curves: dict[str, Curve]) -> list[str]:
    """Arms by mean held-out reward over the run, best first (depends only on the seed)."""
    return sorted(curves, key=lambda n: -curves[n].mean_reward())


def step_costs(curves: dict[str, Curve], task: dict, arms: dict[str, dict]) -> dict[str, float]:
    """Seconds per image-step of each arm's stage 1 (the explorer's draft steps, or full-precision
    sampling), relative to DiffusionNFT's full-precision sampling, from the measured stage times."""
    def per_step(name: str) -> float:
        c, arm = curves[name], arms[name]
        pool = arm["pool"] or task["pool"]
        steps = task["full_steps"] if arm["backend"] == "none" else arm["draft_steps"] or task["draft_steps"]
        return c.stage_seconds.get("explore", 0.0) / (len(c.train_reward) * task["prompts_per_iteration"] * pool * steps)
    base = per_step(BASELINE)
    return {name: per_step(name) / base for name in curves}


def _fmt_speedup(x: float) -> str:
    return "n/a" if math.isnan(x) else "not reached" if x == 0.0 else f"{x:.2f}x"


def report(curves: dict[str, Curve], facts: dict, seed: int, others: dict[int, list[str]]) -> str:
    task = facts["task"]
    target, speed = speedups(curves)
    _, speed_cpu = speedups(curves, cpu=True)
    base_iter = curves[BASELINE].iteration[-1]
    lines = [
        "# Convergence on CPU: Sol-RL vs DiffusionNFT, naive scaling and naive quant (embedded model)",
        "",
        f"`python benchmarks/convergence.py --seed {seed}`: task `{task['prompts']}` "
        f"({facts['training_prompts']} training prompts, {task['held_out']} held out, never trained on), "
        f"P={task['prompts_per_iteration']} prompts per iteration, K={task['keep']} trained per prompt by every "
        f"arm, N={task['pool']}, D={task['draft_steps']} draft / F={task['full_steps']} full Euler steps, "
        f"LoRA r{task['lora_rank']}, lr {task['lr']:g}, {facts['iterations_done']} iterations per arm, "
        f"{facts['threads']} threads, arms interleaved one iteration each in turn; "
        f"{facts['minutes_total']:.0f} min in all. Held-out reward: the `shapes` reward (with partial credit) "
        f"of the {task['held_out']} held-out prompts x {task['eval_seeds']} fixed seeds, sampled at F steps by "
        f"the sampling policy every {task['eval_every']} iterations (untimed); curves smoothed over 3 "
        "measurements.",
        "",
    ]
    if facts["stopped_by_time"]:
        lines += [f"**Stopped by --minutes after {facts['iterations_done']} of {task['iterations']} iterations.**",
                  ""]
    lines += [
        f"DiffusionNFT's final held-out reward: **{target:.4f}** (after {base_iter} iterations). Speed-up = "
        "DiffusionNFT's time to reach it / the arm's time (wall clock of each arm's own work; CPU time in "
        "brackets).",
        "",
        "| arm | s / iteration | stage-1 image-step cost | held-out start | final | mean over the run | iterations to "
        "DiffusionNFT's final | speed-up to DiffusionNFT's final | explore / regenerate / train share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    costs = step_costs(curves, task, facts["arms"])
    for name, c in curves.items():
        n_iter = len(c.train_reward)
        st = c.stage_seconds
        total = sum(st.values()) or 1.0
        share = " / ".join(f"{100 * st.get(k, 0.0) / total:.0f}%" for k in ("explore", "regenerate", "train"))
        reach = c.iterations_to(target)
        lines.append(
            f"| {c.label} | {c.seconds[-1] / max(1, n_iter):.2f} | {costs[name]:.2f}x | {c.smoothed()[0]:.4f} | "
            f"{c.smoothed()[-1]:.4f} | {c.mean_reward():.4f} | "
            f"{reach if math.isfinite(reach) else 'not reached'} | {_fmt_speedup(speed[name])} "
            f"({_fmt_speedup(speed_cpu[name])}) | {share} |")
    order = ranking(curves)
    lines += ["", "Stage-1 image-step cost: seconds per image per ODE step of stage 1 (the explorer's drafts, or "
              "full-precision sampling), relative to DiffusionNFT's full-precision sampling.", "",
              "Ranking by mean held-out reward over the run: " + " > ".join(curves[n].label for n in order) + "."]
    for other_seed, other in sorted(others.items()):
        # Over the arms both runs have (the cpu_bf16 arm runs only where the CPU has native bf16).
        other, mine = [n for n in other if n in curves], [n for n in order if n in other]
        same = "the same" if other == mine else "a different"
        lines.append(f"Seed {other_seed} ranks them: " + " > ".join(curves[n].label for n in other)
                     + f" ({same} order{'' if len(mine) == len(order) else ' of the arms both runs have'}).")
    lines += ["", "Held-out reward (raw) after each number of iterations:", "",
              "| iteration | " + " | ".join(c.label for c in curves.values()) + " |",
              "|---:|" + "---:|" * len(curves)]
    first = next(iter(curves.values()))
    for i, it in enumerate(first.iteration):
        lines.append(f"| {it} | " + " | ".join(f"{c.reward[i]:.4f}" for c in curves.values()) + " |")
    lines += ["", "Paper (8x B200, time to DiffusionNFT's final reward): SANA 2.42x, FLUX.1 3.00x, SD3.5-L 4.64x."]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target, _ = speedups(curves)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, c in curves.items():
        style = {"linestyle": "--"} if name.startswith("naive") else {}
        axes[0].plot([s / 60 for s in c.seconds], c.smoothed(), marker=".", label=c.label, **style)
        axes[1].plot(c.iteration, c.smoothed(), marker=".", label=c.label, **style)
    for ax, xlabel in zip(axes, ("minutes of the arm's own work (wall clock)", "iterations")):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out reward (smoothed)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _other_seeds(out_dir: Path, seed: int, task: dict) -> dict[int, list[str]]:
    """Rankings of earlier runs of the same task with other seeds (their JSON next to this one)."""
    found = {}
    for path in sorted(out_dir.glob("convergence_seed*.json")):
        data = json.loads(path.read_text())
        if data["seed"] != seed and {k: v for k, v in data["facts"]["task"].items() if k != "seed"} == \
                {k: v for k, v in task.items() if k != "seed"}:
            found[data["seed"]] = ranking({n: Curve(**c) for n, c in data["curves"].items()})
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-time cap (stops after a whole round)")
    ap.add_argument("--iterations", type=int, default=Task.iterations)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the raw curves here")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true",
                    help="no training: write the table and plot again from the stored convergence_seed<S>.json "
                         "(e.g. to compare with a seed run since)")
    a = ap.parse_args(argv)
    stem = "convergence" if a.seed == 0 else f"convergence_seed{a.seed}"
    stored = a.out_dir / f"convergence_seed{a.seed}.json"
    if a.report_only:
        if not stored.is_file():
            raise SystemExit(f"error: {stored}: no stored run of seed {a.seed} to report on")
        data = json.loads(stored.read_text())
        curves, facts = {n: Curve(**c) for n, c in data["curves"].items()}, data["facts"]
    else:
        task = Task(seed=a.seed, iterations=a.iterations)
        curves, facts = run_arms(paper_arms(task), task, minutes=a.minutes, threads=a.threads)
        a.out_dir.mkdir(parents=True, exist_ok=True)
        data = {"seed": a.seed, "facts": facts, "curves": {n: asdict(c) for n, c in curves.items()}}
        raw = json.dumps(data, indent=1) + "\n"
        stored.write_text(raw)
        if a.json:
            a.json.write_text(raw)
    text = report(curves, facts, a.seed, _other_seeds(a.out_dir, a.seed, facts["task"]))
    (a.out_dir / f"{stem}.md").write_text(text)
    plot(curves, a.out_dir / f"{stem}.png", f"Held-out reward, embedded model, seed {a.seed}")
    print(text)


if __name__ == "__main__":
    main()
