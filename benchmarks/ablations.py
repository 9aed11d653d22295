"""Ablations as the paper's: draft steps D and pool size N at fixed K, Sol-RL with the NVFP4 explorer.

    python benchmarks/ablations.py [--iterations 20] [--threads 2] [--seed S]

Sol-RL arms on the convergence task (benchmarks/miniature.py), D in {2, 4, 6, 8} at the task's N and
N in {K, 2K, 3K} at the task's D (N = 4K is the D sweep's arm at the task's D), interleaved one
iteration each in turn; final held-out reward (smoothed over the last measurements) and time.
Writes benchmarks/results/ablations.md. About 30 minutes of one idle core with the defaults.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from miniature import RESULTS, Arm, Task, run_arms, write_table


def arms(task: Task) -> dict[str, Arm]:
    out = {f"D={d}": Arm(f"D={d}, N={task.pool}", "emulated", draft_steps=d) for d in (2, 4, 6, 8)}
    for n in (task.keep, 2 * task.keep, 3 * task.keep):
        out[f"N={n}"] = Arm(f"D={task.draft_steps}, N={n}", "emulated", pool=n)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "ablations.md")
    a = ap.parse_args(argv)
    task = Task(iterations=a.iterations, seed=a.seed)
    table = arms(task)
    curves, facts = run_arms(table, task, minutes=a.minutes, threads=a.threads)
    lines = [
        "# Ablations: draft steps D and pool size N (Sol-RL, emulated NVFP4 explorer, embedded model, CPU)",
        "",
        f"`python benchmarks/ablations.py --iterations {a.iterations} --seed {a.seed}`: the convergence task "
        f"(`{task.prompts}`, {task.held_out} prompts held out), P={task.prompts_per_iteration}, "
        f"K={task.keep} trained per prompt, F={task.full_steps}, lr {task.lr:g}, {facts['iterations_done']} "
        f"iterations per arm, {a.threads} threads, arms interleaved; {facts['minutes_total']:.0f} min in all. "
        "Final: the held-out reward smoothed over the last measurements.",
        "",
        "| sweep | D | N | held-out start | final | gain | mean over the run | s / iteration |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arm in table.items():
        c = curves[name]
        n, d = arm.n(task), arm.stage1_steps(task)
        sweep = "D" if name.startswith("D=") else "N"
        start, final = c.smoothed()[0], c.smoothed()[-1]
        lines.append(f"| {sweep} | {d} | {n} | {start:.4f} | {final:.4f} | {final - start:+.4f} | "
                     f"{c.mean_reward():.4f} | {c.seconds[-1] / max(1, len(c.train_reward)):.2f} |")
    lines += ["", "Paper (HPSv2, SANA): D 2/4/6/8 -> 0.3587/0.3650/0.3686/0.3659; N 24/48/72/96 at K=24 -> "
              "0.3569/0.3622/0.3663/0.3686."]
    write_table(a.out, lines)


if __name__ == "__main__":
    main()
