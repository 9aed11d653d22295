"""Rollout time per iteration: naive full-precision scaling vs Sol-RL, side by side.

    python benchmarks/rollout.py [--weights embedded] [--threads 2] [--repeats 3]

The paper's comparison on the embedded model: for P prompts, naive scaling samples the whole pool
of N seeds at full precision with F steps; Sol-RL explores the pool with the low-precision explorer
in D steps and regenerates only K seeds with F steps. Both run through the product's stage
functions, interleaved in each repeat; the table quotes medians and ratios and is written to
benchmarks/results/rollout.md. On a CPU the emulated NVFP4 explorer computes in fp32 after
quantizing (it is the faithful reference, not a fast path), so the gain there comes from D < F and
K < N; `cpu_int8` shows a fast low-precision explorer. On Blackwell GPUs the NVFP4 GEMMs add the
hardware speedup the paper measures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.models import load_policy  # noqa: E402
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
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    policy = load_policy(args.weights)
    reward = load_weighted_reward("shapes")
    prompts = load_prompts("shapes_all")
    tmp = Path(tempfile.mkdtemp())
    sessions = {}
    for backend in ("none", "emulated", "cpu_int8"):
        s = TrainingSession(tmp / backend, policy, prompts, SessionConfig(lora_rank=8, lora_alpha=8.0))
        s.refresh_copies(RequantizeSettings(backend, min_dim=0))
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

    cases = {"naive BF16 scaling (N at full precision, F steps)": naive,
             "Sol-RL, emulated NVFP4 explorer": sol_rl("emulated"),
             "Sol-RL, cpu_int8 explorer": sol_rl("cpu_int8")}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up (prompt encodings, kernels)
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

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
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
