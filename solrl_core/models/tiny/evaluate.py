"""Evaluate the embedded tiny model with the rule-based checker, through the product path
(load_policy + sampling.sample, Euler, no CFG), per prompt kind.

    python -m solrl_core.models.tiny.evaluate [--weights DIR] [--n 64] [--steps 10]

Writes benchmarks/results/tiny_model.md and a sample grid PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ...scenes import KINDS, all_specs, caption
from ..loading import EMBEDDED_DIR

RESULTS_DIR = Path("benchmarks/results")


@dataclass
class KindResult:
    kind: str
    prompts: list[str]
    passed: list[bool]
    scores: list[float]
    checks: dict[str, float]  # pass rate of each named check

    @property
    def pass_rate(self) -> float:
        return sum(self.passed) / len(self.passed)

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores)


def eval_prompts(kind: str, n: int, seed: int = 0) -> list[str]:
    """n prompts of one kind, drawn with a fixed seed (each single-object prompt ~4 times at n=64)."""
    rng = random.Random(f"{seed}-{kind}")
    specs = all_specs(kind)
    return [caption(rng.choice(specs)) for _ in range(n)]


def sample_images(policy, prompts: list[str], seeds: list[int], steps: int = 10,
                  batch_size: int = 64) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1] from a loaded policy through sampling.sample (Euler, no CFG)."""
    from ...sampling import sample

    with torch.no_grad():
        x0 = sample(policy, policy.transformer, policy.encode(prompts), seeds, steps, solver="euler",
                    batch_size=batch_size)
        return policy.decode(x0)


def evaluate(weights: str | Path = EMBEDDED_DIR, n: int = 64, steps: int = 10, seed: int = 0
             ) -> tuple[dict[str, KindResult], dict[str, torch.Tensor]]:
    from ...rewards.shapes import judge
    from .. import load_policy

    policy = load_policy(str(weights))
    results, images = {}, {}
    for k, kind in enumerate(KINDS):
        prompts = eval_prompts(kind, n, seed)
        seeds = [seed * 100_000 + k * 10_000 + i for i in range(n)]
        imgs = sample_images(policy, prompts, seeds, steps)
        arrays = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        judgements = [judge(a, p) for a, p in zip(arrays, prompts)]
        names = sorted({c for j in judgements for c in j.checks})
        checks = {c: sum(j.checks[c] for j in judgements if c in j.checks)
                  / max(1, sum(c in j.checks for j in judgements)) for c in names}
        results[kind] = KindResult(kind, prompts, [j.passed for j in judgements], [j.score for j in judgements],
                                   checks)
        images[kind] = imgs
    return results, images


def weights_size_bytes(weights: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(weights).rglob("*.safetensors"))


def save_grid(images: dict[str, torch.Tensor], path: Path, per_row: int = 16) -> None:
    """One row per kind (first `per_row` samples), upscaled 3x with nearest neighbours."""
    from torchvision.utils import make_grid, save_image

    rows = torch.cat([imgs[:per_row] for imgs in images.values()])
    grid = make_grid(rows, nrow=per_row, padding=2, pad_value=1.0)
    save_image(torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0], path)


def write_report(results: dict[str, KindResult], weights: Path, n: int, steps: int, path: Path,
                 grid: Path) -> str:
    info = {}
    if (weights / "training.json").is_file():
        info = json.loads((weights / "training.json").read_text())
    check_names = sorted({c for r in results.values() for c in r.checks})
    lines = [
        "# Embedded tiny model: rule-based evaluation",
        "",
        f"`python -m solrl_core.models.tiny.evaluate --n {n} --steps {steps}`: {n} prompts per kind (fixed "
        f"seeds), {steps} Euler steps, no CFG, sampled through `load_policy` + `sampling.sample`, judged by "
        "`solrl_core.rewards.shapes.judge`.",
        "",
        "| kind | passed | mean score | " + " | ".join(check_names) + " |",
        "|---|---|---|" + "---|" * len(check_names),
    ]
    for r in results.values():
        cells = [f"{r.checks[c]:.2f}" if c in r.checks else "" for c in check_names]
        lines.append(f"| {r.kind} | {r.pass_rate:.0%} | {r.mean_score:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Check columns: pass rate of each check among the prompts that have it.", "",
              f"Weights: {weights_size_bytes(weights) / 1e6:.1f} MB of fp32 safetensors."]
    if info:
        steps, minutes = info.get("total_steps", info["steps"]), info.get("total_minutes", info["minutes"])
        chain = " (a chain of runs, each continuing the last with --init)" if "init" in info else ""
        lines.append(f"Training: {steps} steps of batch {info['batch_size']} in {minutes:.0f} min on "
                     f"{info['threads']} CPU thread(s){chain}.")
    lines += ["", f"![samples]({grid.name})", "",
              "Rows of the grid: " + ", ".join(f"{k} (first prompts: {', '.join(r.prompts[:3])}, ...)"
                                              for k, r in results.items()) + "."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(EMBEDDED_DIR), help="tiny model folder (default: the shipped one)")
    ap.add_argument("--n", type=int, default=64, help="prompts per kind")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS_DIR / "tiny_model.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = out.with_name("tiny_samples.png")
    results, images = evaluate(a.weights, a.n, a.steps, a.seed)
    save_grid(images, grid)
    print(write_report(results, Path(a.weights), a.n, a.steps, out, grid))


if __name__ == "__main__":
    main()
