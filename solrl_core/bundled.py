"""The workflows shipped in workflows/, defined in code so they never drift from the op specs.

`python -m solrl_core.bundled` rewrites workflows/*.json (UI format, so ComfyUI lists them as
templates); a test checks the files equal what this module generates.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .graph.builder import GraphBuilder
from .graph.workflow import ApiGraph, api_to_ui, dump_json
from .ops.registry import get_op
from .runtime.settings import Settings
from .train import settings as ts

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


_RUN, _QUANT, _EXPLORE = ts.SessionConfig(), ts.RequantizeSettings(), ts.ExploreSettings()
_SELECT, _REGEN, _EVAL, _UPDATE = ts.SelectSettings(), ts.RegenerateSettings(), ts.EvaluateSettings(), ts.UpdateSettings()


@dataclass(frozen=True)
class Recipe:
    """The settings of one training workflow (algorithm.md section 1 names in comments).

    Defaults come from the settings classes (train/settings.py); building a recipe builds every node's
    settings, so a recipe with a bad value (beta = 0, K > N, ...) fails at once with a one-line error.
    """

    model: str = "embedded"
    reward: str = "shapes"
    prompts: str = "shapes_all"
    run_name: str = "sol_rl"
    iterations: int = _RUN.total_iterations
    prompts_per_iteration: int = _EXPLORE.prompts_per_iteration  # P
    candidates: int = _EXPLORE.candidates  # N
    keep: int = _SELECT.keep  # K
    draft_steps: int = _EXPLORE.steps  # D
    full_steps: int = _REGEN.steps  # F
    stage1: str = _EXPLORE.precision  # "low": FP4 explore; "full": sample at full precision (baselines)
    regenerate: bool = True  # False: train directly on the kept drafts (naive baselines)
    backend: str = _QUANT.backend
    min_dim: int = _QUANT.min_dim
    lr: float = _UPDATE.lr
    beta: float = _UPDATE.beta
    kl_coef: float = _UPDATE.kl_coef
    train_fraction: float = _UPDATE.train_fraction
    grad_clip: float = _UPDATE.grad_clip
    micro_batch: int = _UPDATE.micro_batch
    lora_rank: int = _RUN.lora_rank
    lora_alpha: float = _RUN.lora_alpha
    full_finetune: bool = _RUN.full_finetune  # train every weight instead of a LoRA (small models)
    # Memory for time (same results): offload frozen parts, regenerate through the adapter,
    # gradient checkpointing, 8-bit AdamW.
    offload_frozen: bool = _RUN.offload_frozen
    regenerator: str = _QUANT.regenerator
    gradient_checkpointing: bool = _UPDATE.gradient_checkpointing
    optimizer: str = _UPDATE.optimizer
    batch_size: int = _EXPLORE.batch_size
    audit_every: int = _REGEN.audit_every
    eval_every: int = 0  # held-out reward on fixed prompts and seeds (0: no Held-out Reward node)
    held_out: int = _RUN.held_out  # prompts of the set kept out of training, scored by the held-out reward
    eval_prompts: int = _EVAL.prompts  # how many of the held-out prompts (0: all)
    seed: int = _RUN.seed

    def __post_init__(self) -> None:
        self.node_settings()  # builds, hence checks, every node's settings

    def node_settings(self) -> dict[str, Settings]:
        """The settings of each training node of the workflow, by op id."""
        select = ts.SelectSettings(keep=self.keep)
        select.check(candidates=self.candidates)
        low = self.stage1 == "low"
        return {
            "SolRLTrainingRun": ts.SessionConfig(seed=self.seed, total_iterations=self.iterations,
                                              lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                                              full_finetune=self.full_finetune, offload_frozen=self.offload_frozen,
                                              held_out=self.held_out),
            "SolRLRequantize": ts.RequantizeSettings(backend=self.backend if low else "none",
                                                     min_dim=self.min_dim, regenerator=self.regenerator),
            "SolRLFP4Sampler": ts.ExploreSettings(prompts_per_iteration=self.prompts_per_iteration,
                                               candidates=self.candidates,
                                               steps=self.draft_steps if low else self.full_steps,
                                               precision=self.stage1, batch_size=self.batch_size),
            "SolRLProxyRewardRanker": select,
            "SolRLBF16Regenerator": ts.RegenerateSettings(steps=self.full_steps, batch_size=self.batch_size,
                                                       audit_every=self.audit_every),
            "SolRLEvaluate": ts.EvaluateSettings(steps=self.full_steps, prompts=self.eval_prompts,
                                                 every=self.eval_every),
            "SolRLNFTUpdate": ts.UpdateSettings(lr=self.lr, beta=self.beta, kl_coef=self.kl_coef,
                                             train_fraction=self.train_fraction, grad_clip=self.grad_clip,
                                             micro_batch=self.micro_batch,
                                             gradient_checkpointing=self.gradient_checkpointing,
                                             optimizer=self.optimizer),
        }


def training_graph(r: Recipe) -> ApiGraph:
    """Load -> Training Run -> loop[Requantize -> FP4 Sampler -> Ranker -> Regenerator -> Preview ->
    NFT Update] -> Plot Metrics, Save LoRA."""
    settings = r.node_settings()

    def widgets(op_id: str) -> dict:
        """The node's inputs that are fields of its settings, set to the recipe's values."""
        names = {f.name for f in fields(settings[op_id])}
        return {i.name: getattr(settings[op_id], i.name) for i in get_op(op_id).inputs if i.name in names}

    b = GraphBuilder()
    policy = b.add("SolRLLoadPolicy", model=r.model, family="auto", device="auto", dtype="auto")
    reward = b.add("SolRLLoadReward", rewards=r.reward, device="auto")
    prompts = b.add("SolRLPromptSet", source=r.prompts)
    run = b.add("SolRLTrainingRun", policy=policy.out(0), prompts=prompts.out(0), run_name=r.run_name,
                mode="continue", **widgets("SolRLTrainingRun"))
    loop = b.add("SolRLLoopStart", "Loop Start", iterations=r.iterations, value=run.out(0))
    quant = b.add("SolRLRequantize", session=loop.out("value"), **widgets("SolRLRequantize"))
    drafts = b.add("SolRLFP4Sampler", session=quant.out(0), reward=reward.out(0), **widgets("SolRLFP4Sampler"))
    samples = drafts
    if r.keep != r.candidates:
        samples = b.add("SolRLProxyRewardRanker", drafts=drafts.out(0), **widgets("SolRLProxyRewardRanker"))
    if r.regenerate:
        samples = b.add("SolRLBF16Regenerator", kept=samples.out(0), reward=reward.out(0),
                        **widgets("SolRLBF16Regenerator"))
    if r.eval_every:
        samples = b.add("SolRLEvaluate", samples=samples.out(0), reward=reward.out(0), **widgets("SolRLEvaluate"))
    preview = b.add("SolRLPreview", samples=samples.out(0), max_prompts=4, scale=4)
    update = b.add("SolRLNFTUpdate", samples=preview.out("samples"), **widgets("SolRLNFTUpdate"))
    end = b.add("SolRLLoopEnd", "Loop End", flow=loop.out("flow"), value=update.out("session"),
                stop=update.out("done"))
    b.add("SolRLPlotMetrics", session=end.out("value"), metric="reward_mean")
    b.add("SolRLSaveLoRA", session=end.out("value"), weights="ema", filename=f"{r.run_name}_lora")
    return b.graph


# The paper's settings (algorithm.md sections 1 and 3) for the real models; the quickstart is sized
# to finish in minutes on a laptop CPU with the embedded model, on the skill it is weak at (counts),
# with the settings of benchmarks/convergence.py's Sol-RL arm. The explorer quantizes what SANA's rule
# quantizes at the embedded model's width (128): the feed-forward layers.
QUICKSTART = Recipe(run_name="quickstart", prompts="shapes_count", held_out=15, iterations=30,
                    prompts_per_iteration=8, candidates=32, keep=8, draft_steps=6, full_steps=8, min_dim=128,
                    lr=1e-3, eval_every=3, lora_rank=16, lora_alpha=16.0, micro_batch=16, batch_size=64)
PAPER = dict(reward="pickscore:1,hpsv2:1,clipscore:1", prompts="prompts/general.txt", iterations=300)
RECIPES: dict[str, tuple[Recipe, str]] = {
    "quickstart": (QUICKSTART, "Sol-RL on the embedded tiny model with the rule-based shapes reward, on counts "
                   "('three red circles'), the skill it is weak at: 30 iterations of 8 prompts x 32 drafts, keep "
                   "the 4 best and 4 worst, regenerate, NFT update. 15 of the 45 count prompts are held out: "
                   "never trained on, scored every 3 iterations as eval_reward_mean in metrics.jsonl. Runs on "
                   "a laptop CPU in minutes; watch reward_mean rise in Plot Metrics."),
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
    # The baselines of benchmarks/convergence.py on the quickstart's task (prompts, split, P, K, F, lr),
    # so a run of each is comparable with the quickstart's.
    "diffusionnft": (replace(QUICKSTART, run_name="diffusionnft", candidates=QUICKSTART.keep, stage1="full",
                             regenerate=False),
                     "Baseline DiffusionNFT '24-in-24' (here 8-in-8) on the quickstart's task: no exploration "
                     "stage, every sample at full precision is trained on."),
    "naive_scaling": (replace(QUICKSTART, run_name="naive_scaling", stage1="full", regenerate=False),
                      "Baseline naive scaling '24-in-96' (here 8-in-32) on the quickstart's task: the whole pool at "
                      "full precision and full steps, keep best and worst, train on them."),
    "naive_quant": (replace(QUICKSTART, run_name="naive_quant", regenerate=False),
                    "Negative control 'naive quant' on the quickstart's task: explore at low precision and train "
                    "directly on the low-precision drafts (the paper shows this is unstable)."),
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
