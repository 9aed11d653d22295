"""The workflows shipped in workflows/, defined in code so they never drift from the op specs.

`python -m solrl_core.bundled` rewrites workflows/*.json (UI format, so ComfyUI lists them as
templates); a test checks the files equal what this module generates.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .graph.builder import GraphBuilder
from .graph.workflow import ApiGraph, api_to_ui, dump_json

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"


@dataclass(frozen=True)
class Bundled:
    name: str
    note: str  # shown in a Note node: what it does and what to set
    build: Callable[[], ApiGraph]


def demo_loop() -> ApiGraph:
    b = GraphBuilder()
    zero = b.add("SolRLNumber", "Initial total", value=0.0)
    start = b.add("SolRLLoopStart", "Loop Start", iterations=10, value=zero.out("value"))
    add = b.add("SolRLMath", "Add 1.5", a=start.out("value"), b=1.5, operation="add")
    logged = b.add("SolRLLogMetric", "Log running total", name="running_total", value=add.out("result"),
                   step=start.out("index"))
    end = b.add("SolRLLoopEnd", "Loop End", flow=start.out("flow"), value=logged.out("value"))
    b.add("SolRLLogMetric", "Log final total", name="final_total", value=end.out("value"))
    return b.graph


@dataclass(frozen=True)
class Recipe:
    """The settings of one training workflow (algorithm.md section 1 names in comments)."""

    model: str = "embedded"
    reward: str = "shapes"
    prompts: str = "shapes_all"
    run_name: str = "sol_rl"
    iterations: int = 100
    prompts_per_iteration: int = 48  # P
    candidates: int = 96  # N
    keep: int = 24  # K
    draft_steps: int = 6  # D
    full_steps: int = 10  # F
    stage1: str = "low"  # "low": FP4 explore; "full": sample at full precision (baselines)
    regenerate: bool = True  # False: train directly on the kept drafts (naive baselines)
    backend: str = "auto"
    min_dim: int = -1
    lr: float = 3e-4
    beta: float = 1.0
    kl_coef: float = 1e-4
    train_fraction: float = 0.6
    grad_clip: float = 1.0
    micro_batch: int = 8
    lora_rank: int = 32
    lora_alpha: float = 64.0
    full_finetune: bool = False  # train every weight instead of a LoRA (small models)
    batch_size: int = 32
    audit_every: int = 0
    eval_every: int = 0  # held-out reward on fixed prompts and seeds (0: off)
    held_out: int = 0  # prompts of the set kept out of training, scored by the held-out reward
    eval_prompts: int = 0  # how many of the held-out prompts (0: all)
    seed: int = 0


def training_graph(r: Recipe) -> ApiGraph:
    """Load -> Training Run -> loop[Requantize -> FP4 Sampler -> Ranker -> Regenerator -> Preview ->
    NFT Update] -> Plot Metrics, Save LoRA."""
    b = GraphBuilder()
    policy = b.add("SolRLLoadPolicy", model=r.model, family="auto", device="auto", dtype="auto")
    reward = b.add("SolRLLoadReward", rewards=r.reward, device="auto")
    prompts = b.add("SolRLPromptSet", source=r.prompts)
    run = b.add("SolRLTrainingRun", policy=policy.out(0), prompts=prompts.out(0), run_name=r.run_name,
                mode="continue", seed=r.seed, total_iterations=r.iterations, lora_rank=r.lora_rank,
                lora_alpha=r.lora_alpha, full_finetune=r.full_finetune, held_out=r.held_out)
    loop = b.add("SolRLLoopStart", "Loop Start", iterations=r.iterations, value=run.out(0))
    quant = b.add("SolRLRequantize", trainer=loop.out("value"),
                  backend=r.backend if r.stage1 == "low" else "none", min_dim=r.min_dim, weight_tile="16x16")
    drafts = b.add("SolRLFP4Sampler", trainer=quant.out(0), reward=reward.out(0),
                   prompts_per_iteration=r.prompts_per_iteration, candidates=r.candidates,
                   steps=r.draft_steps if r.stage1 == "low" else r.full_steps, precision=r.stage1,
                   batch_size=r.batch_size)
    samples = drafts
    if r.keep != r.candidates:  # (K > N is refused at validation)
        samples = b.add("SolRLProxyRewardRanker", drafts=drafts.out(0), keep=r.keep, mode="best_worst")
    if r.regenerate:
        samples = b.add("SolRLBF16Regenerator", kept=samples.out(0), reward=reward.out(0), steps=r.full_steps,
                        batch_size=r.batch_size, audit_every=r.audit_every, audit_size=16)
    if r.eval_every:
        samples = b.add("SolRLEvaluate", samples=samples.out(0), reward=reward.out(0), steps=r.full_steps,
                        prompts=r.eval_prompts, per_prompt=4, every=r.eval_every)
    preview = b.add("SolRLPreview", samples=samples.out(0), max_prompts=4, scale=4)
    update = b.add("SolRLNFTUpdate", samples=preview.out("samples"), lr=r.lr, beta=r.beta, kl_coef=r.kl_coef,
                   train_fraction=r.train_fraction, grad_clip=r.grad_clip, micro_batch=r.micro_batch)
    end = b.add("SolRLLoopEnd", "Loop End", flow=loop.out("flow"), value=update.out("trainer"),
                stop=update.out("done"))
    b.add("SolRLPlotMetrics", trainer=end.out("value"), metric="reward_mean")
    b.add("SolRLSaveLoRA", trainer=end.out("value"), weights="ema", filename=f"{r.run_name}_lora")
    return b.graph


# The paper's settings (algorithm.md sections 1 and 3) for the real models; the quickstart is sized
# to finish in minutes on a laptop CPU with the embedded model.
QUICKSTART = Recipe(run_name="quickstart", prompts="shapes_single", iterations=30, prompts_per_iteration=16,
                    candidates=16, keep=8, draft_steps=4, full_steps=8, min_dim=0, lr=1e-3, eval_every=3,
                    eval_prompts=15,
                    lora_rank=16, lora_alpha=16.0, micro_batch=16, batch_size=64)
PAPER = dict(reward="pickscore:1,hpsv2:1,clipscore:1", prompts="prompts/general.txt", iterations=300)
RECIPES: dict[str, tuple[Recipe, str]] = {
    "quickstart": (QUICKSTART, "Sol-RL on the embedded tiny model with the rule-based shapes reward: 30 "
                   "iterations of 16 single-object prompts x 16 drafts, keep the 4 best and 4 worst, regenerate, "
                   "NFT update. Runs on a laptop CPU in minutes; watch reward_mean rise in Plot Metrics and "
                   "eval_reward_mean (fixed prompts and seeds) in metrics.jsonl."),
    "sol_rl_sana": (Recipe(model="Efficient-Large-Model/Sana_1600M_1024px_diffusers", run_name="sol_rl_sana",
                           train_fraction=0.6, **PAPER),
                    "Sol-RL on SANA 1.6B, the paper's settings: P=48, N=96, K=24, 6 draft / 10 full Euler steps, "
                    "LoRA r32/a64, AdamW 3e-4. Set the model (folder or cached repo id), the reward weights "
                    "files (SOLRL_MODELS_DIR) and your prompt file."),
    "sol_rl_flux1": (Recipe(model="black-forest-labs/FLUX.1-dev", run_name="sol_rl_flux1", train_fraction=0.4,
                            **PAPER),
                     "Sol-RL on FLUX.1-dev, the paper's settings (DPM-Solver-2, T_train fraction 0.4). Set the "
                     "model, reward files and prompts."),
    "sol_rl_sd35": (Recipe(model="stabilityai/stable-diffusion-3.5-large", run_name="sol_rl_sd35",
                           train_fraction=0.6, grad_clip=0.002, **PAPER),
                    "Sol-RL on SD3.5-Large, the paper's settings (grad clip 0.002 as the reference preset). "
                    "Set the model, reward files and prompts."),
    "diffusionnft": (Recipe(run_name="diffusionnft", iterations=12, prompts_per_iteration=4, candidates=4, keep=4,
                            full_steps=8, stage1="full", regenerate=False, lr=1e-3, lora_rank=16,
                            lora_alpha=16.0, micro_batch=16, batch_size=64),
                     "Baseline DiffusionNFT '24-in-24' (here 4-in-4 on the embedded model): no exploration stage, "
                     "every sample at full precision is trained on."),
    "naive_scaling": (Recipe(run_name="naive_scaling", iterations=12, prompts_per_iteration=4, candidates=16, keep=4,
                             full_steps=8, stage1="full", regenerate=False, lr=1e-3, lora_rank=16,
                             lora_alpha=16.0, micro_batch=16, batch_size=64),
                      "Baseline naive scaling '24-in-96' (here 4-in-16): the whole pool at full precision and full "
                      "steps, keep best and worst, train on them."),
    "naive_quant": (Recipe(run_name="naive_quant", iterations=12, prompts_per_iteration=4, candidates=16, keep=4,
                           draft_steps=4, full_steps=8, regenerate=False, min_dim=0, lr=1e-3, lora_rank=16,
                           lora_alpha=16.0, micro_batch=16, batch_size=64),
                    "Negative control 'naive quant': explore at low precision and train directly on the "
                    "low-precision drafts (the paper shows this is unstable)."),
}

BUNDLED: dict[str, Bundled] = {
    w.name: w for w in (
        Bundled("demo_loop", "A loop of trivial nodes: adds 1.5 ten times and logs the running total. "
                "Shows how Loop Start / Loop End repeat the nodes between them.", demo_loop),
        *(Bundled(name, note, lambda r=recipe: training_graph(r)) for name, (recipe, note) in RECIPES.items()),
    )
}


def render(name: str) -> str:
    w = BUNDLED[name]
    return dump_json(api_to_ui(w.build(), notes={f"About: {name}": w.note}))


def write_all(folder: Path = WORKFLOWS_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in BUNDLED:
        path = folder / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else WORKFLOWS_DIR):
        print(p)
