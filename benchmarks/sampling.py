"""Sampling speed of the embedded tiny model: images per second at 6 and 10 Euler steps.

    python benchmarks/sampling.py [--weights DIR] [--batch 32] [--threads 2] [--repeats 5]

Runs through the product path (load_policy + sampling.sample, prompt encodings cached as in a
rollout), the step counts interleaved in each repeat; the table quotes medians and writes
benchmarks/results/sampling.md (or --out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.models import load_policy  # noqa: E402
from solrl_core.models.loading import EMBEDDED_DIR  # noqa: E402
from solrl_core.models.tiny.evaluate import eval_prompts  # noqa: E402
from solrl_core.sampling import sample  # noqa: E402

STEP_COUNTS = (6, 10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(EMBEDDED_DIR))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    policy = load_policy(a.weights)
    prompts = [p for kind in ("single", "count", "relation") for p in eval_prompts(kind, a.batch)][:a.batch]
    cond = policy.encode(prompts)
    seeds = list(range(a.batch))
    times: dict[int, list[float]] = {s: [] for s in STEP_COUNTS}
    with torch.no_grad():
        sample(policy, policy.transformer, cond, seeds, 2)  # warm-up
        for _ in range(a.repeats):
            for steps in STEP_COUNTS:
                t0 = time.perf_counter()
                sample(policy, policy.transformer, cond, seeds, steps, solver="euler")
                times[steps].append(time.perf_counter() - t0)
    params = sum(p.numel() for p in policy.transformer.parameters())
    lines = [
        "# Embedded tiny model: sampling speed",
        "",
        f"`python benchmarks/sampling.py --batch {a.batch} --threads {a.threads} --repeats {a.repeats}`: "
        f"batch {a.batch} at 32x32, fp32, Euler, no CFG, {a.threads} CPU threads, prompt encodings cached "
        f"(as in a rollout); median of {a.repeats} interleaved repeats. Transformer: {params / 1e6:.2f} M parameters.",
        "",
        "| Euler steps | s per batch (median) | images / s | ms per model call (batch) |",
        "|---|---|---|---|",
    ]
    for steps in STEP_COUNTS:
        med = statistics.median(times[steps])
        lines.append(f"| {steps} | {med:.2f} | {a.batch / med:.1f} | {1000 * med / steps:.0f} |")
    lines += ["", f"Ratio 10 vs 6 steps (time): {statistics.median(times[10]) / statistics.median(times[6]):.2f} "
              "(ideal 1.67). CPU timings on a shared machine are noisy: compare within one run."]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
