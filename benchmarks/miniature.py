"""The method in miniature: Sol-RL and its baselines as arms on one task of the embedded model.

Shared by benchmarks/convergence.py, ablations.py and fidelity.py. An arm is one training run (its own
policy, session and run directory) driven through the product's stage functions exactly as the
bundled workflows drive them (Requantize -> FP4 Sampler -> Proxy Reward Ranker -> BF16 Regenerator
-> NFT Update); the arms differ only in how stage 1 and 2 are configured. All arms share the prompts,
seed, K, F and learning rate of one `Task`, and run interleaved (one iteration of each in turn), each
timing its own work; the held-out reward is measured between iterations and not timed.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solrl_core.models import load_policy  # noqa: E402
from solrl_core.quant.backends import cpu_has_native_bf16  # noqa: E402
from solrl_core.rewards import load_weighted_reward  # noqa: E402
from solrl_core.train.prompts import load_prompts  # noqa: E402
from solrl_core.train.session import TrainingSession  # noqa: E402
from solrl_core.train.settings import (  # noqa: E402
    EvaluateSettings,
    ExploreSettings,
    RegenerateSettings,
    RequantizeSettings,
    SelectSettings,
    SessionConfig,
    UpdateSettings,
)
from solrl_core.train.stages import explore, held_out_reward, regenerate, select, update  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NVFP4_MIN_DIM = 128  # the embedded model's width


def write_table(path: Path, lines: list[str]) -> str:
    """Write a benchmark's markdown report (creating its folder) and print it."""
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return text


@dataclass(frozen=True)
class Task:
    """What every arm shares (algorithm.md section 1 names)."""

    prompts: str = "shapes_count"
    held_out: int = 15  # prompts of the set never trained on; the held-out reward scores them
    eval_seeds: int = 16  # fixed seeds per held-out prompt (each image's reward is coarse: average many)
    eval_every: int = 4  # iterations between held-out measurements (and after the last one)
    iterations: int = 40
    prompts_per_iteration: int = 8  # P
    pool: int = 32  # N (arms that explore or scale)
    keep: int = 8  # K, trained per prompt by every arm
    draft_steps: int = 6  # D (at 4, fewer steps alone reorder the drafts: benchmarks/results/fidelity.md)
    full_steps: int = 8  # F
    lr: float = 1e-3
    lora_rank: int = 16
    lora_alpha: float = 16.0
    full_finetune: bool = False
    micro_batch: int = 16
    batch_size: int = 64
    seed: int = 0

    def update_settings(self) -> UpdateSettings:
        return UpdateSettings(lr=self.lr, micro_batch=self.micro_batch)


@dataclass(frozen=True)
class Arm:
    """How one arm fills stages 1 and 2."""

    label: str
    backend: str  # explorer of stage 1: "emulated" (NVFP4), "cpu_int8", "cpu_bf16", or "none" (full precision)
    pool: int | None = None  # N; None: the task's
    draft_steps: int | None = None  # D for a low-precision stage 1; None: the task's
    regenerate: bool = True  # False: train on what stage 1 sampled (the naive arms)
    # Explorer layers: max(in, out) <= min_dim stay full precision. NVFP4 follows SANA's rule at the
    # embedded model's width (128: feed-forward quantized, attention not); 4 bits on every linear of so
    # small a model scrambles the ranking (fidelity.md). int8 loses little on every linear and gains more.
    min_dim: int = NVFP4_MIN_DIM

    def n(self, task: Task) -> int:
        return task.pool if self.pool is None else self.pool

    def stage1_steps(self, task: Task) -> int:
        if self.backend == "none":
            return task.full_steps  # full precision samples at F steps
        return task.draft_steps if self.draft_steps is None else self.draft_steps


def paper_arms(task: Task) -> dict[str, Arm]:
    """The five arms of the paper's comparison, sized like the paper: K trained per prompt by all; and,
    on a CPU with native bf16, Sol-RL with the cpu_bf16 explorer (the CPU's fastest: rollout.md)."""
    bf16 = {"sol_rl_bf16": Arm("Sol-RL, cpu_bf16 explorer", "cpu_bf16")} if cpu_has_native_bf16() else {}
    return {
        "sol_rl_nvfp4": Arm("Sol-RL, emulated NVFP4 explorer", "emulated"),
        "sol_rl_int8": Arm("Sol-RL, cpu_int8 explorer", "cpu_int8", min_dim=0),
        **bf16,
        "diffusionnft": Arm("DiffusionNFT (K-in-K, full precision)", "none", pool=task.keep, regenerate=False),
        "naive_scaling": Arm("naive scaling (K-in-N, full precision)", "none", regenerate=False),
        "naive_quant": Arm("naive quant (train on the NVFP4 drafts)", "emulated", regenerate=False),
    }


@dataclass
class Curve:
    """One arm's record: held-out reward after `iteration` updates, at `seconds` of its own work."""

    label: str
    iteration: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall clock of the arm's own work
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of the same work
    reward: list[float] = field(default_factory=list)  # held-out reward mean
    train_reward: list[float] = field(default_factory=list)  # per iteration: reward of what was trained on
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed per stage over the run

    def smoothed(self) -> list[float]:
        """The held-out reward with less seed noise: a centred 3-point mean, the last point the mean of
        the last two; the first (the base model, the same for every arm) as measured."""
        r = self.reward
        return r[:1] + [sum(r[i - 1: i + 2]) / len(r[i - 1: i + 2]) for i in range(1, len(r))]

    def time_to(self, target: float, cpu: bool = False) -> float:
        """Seconds of work until the smoothed held-out reward first reaches `target` (linear between
        measurements); inf if it never does."""
        s, t = self.smoothed(), self.cpu_seconds if cpu else self.seconds
        for i, value in enumerate(s):
            if value >= target:
                if i == 0:
                    return t[0]
                frac = (target - s[i - 1]) / (value - s[i - 1])
                return t[i - 1] + frac * (t[i] - t[i - 1])
        return math.inf

    def mean_reward(self) -> float:
        """Mean held-out reward over the run's measurements: the area under its curve (per iteration),
        which rewards rising early and is less at the mercy of one measurement than the final value."""
        return sum(self.reward) / len(self.reward)

    def iterations_to(self, target: float) -> float:
        s = self.smoothed()
        return next((self.iteration[i] for i, v in enumerate(s) if v >= target), math.inf)


class ArmRun:
    """An arm's training run, advanced one iteration at a time."""

    def __init__(self, name: str, arm: Arm, task: Task, root: Path, reward):
        self.name, self.arm, self.task, self.reward = name, arm, task, reward
        prompts = load_prompts(task.prompts)
        self.session = TrainingSession(
            root / name, load_policy("embedded"), prompts,
            SessionConfig(seed=task.seed, total_iterations=task.iterations, lora_rank=task.lora_rank,
                          lora_alpha=task.lora_alpha, full_finetune=task.full_finetune, held_out=task.held_out),
            resume=False)
        self.curve = Curve(arm.label)
        self.wall = self.cpu = 0.0

    def _held_out(self) -> None:
        """Measure (untimed) with the current sampling policy, after session.iteration updates."""
        t = self.task
        row = held_out_reward(self.session, self.reward,
                              EvaluateSettings(steps=t.full_steps, per_prompt=t.eval_seeds, batch_size=t.batch_size))
        c = self.curve
        c.iteration.append(self.session.iteration)
        c.seconds.append(self.wall)
        c.cpu_seconds.append(self.cpu)
        c.reward.append(row["eval_reward_mean"])

    def step(self) -> None:
        """One iteration; measures the held-out reward first when one is due."""
        s, a, t = self.session, self.arm, self.task
        wall, cpu = time.perf_counter(), time.process_time()
        s.refresh_copies(RequantizeSettings(a.backend, min_dim=a.min_dim))
        if s.iteration % t.eval_every == 0:
            pause = time.perf_counter(), time.process_time()
            self._held_out()
            wall += time.perf_counter() - pause[0]
            cpu += time.process_time() - pause[1]
        low = a.backend != "none"
        batch = explore(s, self.reward, ExploreSettings(t.prompts_per_iteration, a.n(t), a.stage1_steps(t),
                                                        "low" if low else "full", t.batch_size))
        if a.n(t) != t.keep:
            batch = select(batch, SelectSettings(keep=t.keep))
        if a.regenerate:
            batch = regenerate(batch, self.reward, RegenerateSettings(t.full_steps, t.batch_size))
        self.curve.train_reward.append(s.pending["reward_mean"] if a.regenerate else
                                       _mean_finite(batch.rewards))
        stats = update(batch, t.update_settings())
        for key, value in {**s.pending, **stats}.items():
            if key.startswith("time_"):
                self.curve.stage_seconds[key[5:]] = self.curve.stage_seconds.get(key[5:], 0.0) + value
        s.commit(stats)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu

    def finish(self) -> None:
        """The held-out reward after the last update."""
        if not self.curve.iteration or self.curve.iteration[-1] != self.session.iteration:
            self.session.refresh_copies(RequantizeSettings(self.arm.backend, min_dim=self.arm.min_dim))
            self._held_out()


def _mean_finite(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return x.mean().item() if x.numel() else math.nan


def run_arms(arms: dict[str, Arm], task: Task, minutes: float | None = None, threads: int = 2,
             log: Callable[[str], None] | None = None) -> tuple[dict[str, Curve], dict]:
    """Train every arm for task.iterations, interleaved one iteration each in turn. With `minutes`,
    stop after the round that would overrun it (the record says so). Returns curves and run facts."""
    log = log or (lambda line: print(line, flush=True))  # progress shows in a redirected log too
    torch.set_num_threads(threads)
    reward = load_weighted_reward("shapes")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="solrl-miniature-") as root:
        runs = [ArmRun(name, arm, task, Path(root), reward) for name, arm in arms.items()]
        done, stopped = 0, False
        for i in range(task.iterations):
            round_start = time.perf_counter()
            for r in runs:
                r.step()
            done = i + 1
            elapsed = time.perf_counter() - start
            log(f"iteration {done}/{task.iterations} ({elapsed / 60:.1f} min): " + ", ".join(
                f"{r.name} {r.curve.reward[-1]:.3f}@{r.curve.iteration[-1]}" for r in runs))
            if minutes is not None and done < task.iterations and (
                    elapsed + (time.perf_counter() - round_start) > 60 * minutes):
                stopped = True
                break
        for r in runs:
            r.finish()
        prompts = runs[0].session
        facts = {"task": asdict(task), "iterations_done": done, "stopped_by_time": stopped,
                 "threads": threads, "minutes_total": (time.perf_counter() - start) / 60,
                 "training_prompts": len(prompts.prompts), "held_out_prompts": prompts.held_out_prompts,
                 "arms": {name: asdict(arm) for name, arm in arms.items()}}
    return {r.name: r.curve for r in runs}, facts
