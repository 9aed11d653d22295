"""The Sol-RL nodes: loaders, Training Run, Requantize, FP4 Sampler, Proxy Reward Ranker,
BF16 Regenerator and NFT Update. Thin: the work is in solrl_core.train."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..quant import BACKENDS
from ..runtime.context import MODEL_FOLDER_KINDS, REWARD_FOLDER_KINDS, current_context
from ..runtime.files import check_writable
from .registry import register
from .spec import Input, InputError, OpSpec, Output

POLICY, REWARD, PROMPTS = "SOLRL_POLICY", "SOLRL_REWARD", "SOLRL_PROMPTS"
TRAINER, SAMPLES = "SOLRL_TRAINER", "SOLRL_SAMPLES"
CAT = "Sol-RL"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs; fp32 on CPU, where bf16 matmul is ~5x slower without AMX/AVX512-BF16."""
    return DTYPES[dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


# --- Load Policy ------------------------------------------------------------------------------
def _model_source(model: str) -> str:
    """A name in a host model folder (ComfyUI's diffusers / checkpoints) becomes its path."""
    if model == "embedded" or Path(model).expanduser().exists():
        return model
    for kind in MODEL_FOLDER_KINDS:
        for folder in current_context().search_dirs.get(kind, []):
            if (Path(folder) / model).exists():
                return str(Path(folder) / model)
    return model


def _check_policy(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    from ..models.loading import resolve_source

    base = inputs.get("base", "")
    resolve_source(_model_source(inputs.get("model", "embedded")), _model_source(base) if base else None)


def load_policy_op(model: str, family: str, device: str, dtype: str, base: str = "") -> tuple:
    from ..models import load_policy

    dev = resolve_device(device)
    kwargs = {"base": _model_source(base)} if base else {}
    return (load_policy(_model_source(model), family, dev, resolve_dtype(dtype, dev), **kwargs),)


register(OpSpec(
    id="SolRLLoadPolicy", display_name="Load Policy", category=f"{CAT}/loaders",
    description="Load the text-to-image flow model to train: 'embedded' (the tiny model shipped with "
                "Sol-RL), a diffusers folder, a repo id in the local Hugging Face cache, or a single-file "
                "transformer checkpoint (with 'base' for the rest of the pipeline).",
    inputs=(
        Input("model", "COMBO", "embedded", choices=("embedded",), choices_from="models",
              tooltip="'embedded', a model in ComfyUI's diffusers / checkpoints folders, a folder, a cached "
                      "repo id or a single file."),
        Input("family", "COMBO", "auto", choices=("auto", "sana", "flux", "sd3")),
        Input("device", "COMBO", "auto", choices=("auto", "cpu", "cuda")),
        Input("dtype", "COMBO", "auto", choices=tuple(DTYPES),
              tooltip="auto: bfloat16 on GPU, float32 on CPU."),
        Input("base", "STRING", "", optional=True,
              tooltip="For a single-file checkpoint: the folder / repo id with its text encoders and VAE."),
    ),
    outputs=(Output("policy", POLICY),),
    function=load_policy_op,
    validate=_check_policy,
    trains=True,  # its weights are trained later: never create them as inference tensors
))


# --- Load Reward ------------------------------------------------------------------------------
def _reward_search_dirs() -> list[str]:
    dirs = current_context().search_dirs
    return list(dict.fromkeys(d for kind in REWARD_FOLDER_KINDS for d in dirs.get(kind, [])))


def _build_reward(rewards: str, device: str, path: str = ""):
    from ..rewards import WeightedReward, load_reward, parse_reward_spec

    dev = resolve_device(device)
    parts = parse_reward_spec(rewards)
    if path and len(parts) > 1:
        raise InputError("path", "an explicit path applies to a single reward; use SOLRL_MODELS_DIR for several")
    return WeightedReward([(load_reward(name, path=path or None, device=dev, search_dirs=_reward_search_dirs()), w)
                           for name, w in parts])


def _check_reward(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    try:
        reward = _build_reward(inputs.get("rewards", "shapes"), "cpu", inputs.get("path", ""))
    except ValueError as e:
        raise InputError("rewards", str(e)) from None
    reward.check_files()


def load_reward_op(rewards: str, device: str, path: str = "") -> tuple:
    return (_build_reward(rewards, device, path),)


register(OpSpec(
    id="SolRLLoadReward", display_name="Load Reward", category=f"{CAT}/loaders",
    description="One reward or a weighted sum, e.g. 'shapes' or 'pickscore:1,hpsv2:1,clipscore:1'. Weights "
                "come from 'path', SOLRL_MODELS_DIR, or ComfyUI's solrl_rewards / clip folders.",
    inputs=(
        Input("rewards", "STRING", "shapes", tooltip="name[:weight], comma separated."),
        Input("device", "COMBO", "auto", choices=("auto", "cpu", "cuda")),
        Input("path", "STRING", "", optional=True, tooltip="Weights file or folder of a single reward."),
    ),
    outputs=(Output("reward", REWARD),),
    function=load_reward_op,
    validate=_check_reward,
))


# --- Prompt Set -------------------------------------------------------------------------------
def _check_prompts(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    from ..train.prompts import load_prompts

    try:
        load_prompts(inputs.get("source", "shapes_all"))
    except (FileNotFoundError, ValueError) as e:
        raise InputError("source", str(e)) from None


def prompt_set_op(source: str) -> tuple:
    from ..train.prompts import load_prompts

    return (load_prompts(source),)


register(OpSpec(
    id="SolRLPromptSet", display_name="Prompt Set", category=f"{CAT}/loaders",
    description="Training prompts: a built-in set for the embedded model (shapes_single, shapes_count, "
                "shapes_relation, shapes_compositional, shapes_all) or a .txt (one per line) / .json file.",
    inputs=(Input("source", "STRING", "shapes_all", tooltip="Built-in set name or a prompt file."),),
    outputs=(Output("prompts", PROMPTS),),
    function=prompt_set_op,
    validate=_check_prompts,
))


# --- Training Run -----------------------------------------------------------------------------
def _check_run(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    ctx = current_context()
    run_dir = ctx.run_dir or ctx.runs_root / inputs.get("run_name", "sol_rl")
    try:
        check_writable(Path(run_dir))
    except PermissionError as e:
        raise InputError("run_name", str(e)) from None
    source = linked.get("prompts", {})
    if inputs.get("held_out") and source.get("class_type") == "SolRLPromptSet":
        from ..train.prompts import load_prompts, split_prompts

        try:
            prompts = load_prompts(source.get("source", "shapes_all"))
        except (FileNotFoundError, ValueError):
            return  # the Prompt Set node reports its own file
        try:
            split_prompts(prompts, inputs["held_out"], inputs.get("seed", 0))
        except ValueError as e:
            raise InputError("held_out", str(e)) from None


def training_run_op(policy, prompts: list[str], run_name: str, mode: str, seed: int, total_iterations: int,
                    lora_rank: int, lora_alpha: float, full_finetune: bool, held_out: int = 0) -> tuple:
    from ..train.session import SessionConfig, open_session

    ctx = current_context()
    run_dir = ctx.run_dir or ctx.runs_root / run_name
    config = SessionConfig(seed=seed, total_iterations=total_iterations, lora_rank=lora_rank,
                           lora_alpha=lora_alpha, full_finetune=full_finetune, held_out=held_out)
    session = open_session(Path(run_dir), policy, prompts, config, mode=mode)
    ctx.status(f"run {run_dir}: iteration {session.iteration} of {total_iterations}")
    return (session,)


register(OpSpec(
    id="SolRLTrainingRun", display_name="Training Run", category=CAT,
    description="Opens (or resumes) a training run: LoRA adapters 'default' (trained) and 'old' (sampling), "
                "the optimizer and all counters live in its run directory. Queue the workflow again with "
                "mode 'continue' to go on where it stopped.",
    inputs=(
        Input("policy", POLICY),
        Input("prompts", PROMPTS),
        Input("run_name", "STRING", "sol_rl", tooltip="Folder under the runs directory (headless: --run-dir wins)."),
        Input("mode", "COMBO", "continue", choices=("continue", "new"),
              tooltip="continue: resume from the latest checkpoint if there is one; new: start over."),
        Input("seed", "INT", 0, min=0, max=2**31 - 1, seed=True, tooltip="Fixes every random draw of the run."),
        Input("total_iterations", "INT", 100, min=1, max=10**7, tooltip="The run ends after this many iterations."),
        Input("lora_rank", "INT", 32, min=1, max=1024),
        Input("lora_alpha", "FLOAT", 64.0, min=0.0, max=4096.0),
        Input("full_finetune", "BOOLEAN", False, tooltip="Train every weight instead of LoRA (small models)."),
        Input("held_out", "INT", 0, min=0, max=10**6, optional=True,
              tooltip="Prompts of the set kept out of training (a split seeded by 'seed'), scored by the "
                      "Held-out Reward node; 0: none."),
    ),
    outputs=(Output("trainer", TRAINER),),
    function=training_run_op,
    always_run=True,  # re-queueing must continue training, never replay a cached result
    validate=_check_run,
    trains=True,  # creates the trainable adapters
))


# --- Requantize -------------------------------------------------------------------------------
def requantize_op(trainer, backend: str, min_dim: int = -1, weight_tile: str = "16x16") -> tuple:
    tile = (16, 16) if weight_tile == "16x16" else (1, 16)
    copies = trainer.refresh_copies(backend, None if min_dim < 0 else min_dim, tile)
    current_context().status(f"iteration {trainer.iteration}: explorer backend {copies.backend} "
                             f"({copies.backend_reason})")
    return (trainer,)


register(OpSpec(
    id="SolRLRequantize", display_name="Requantize", category=CAT,
    description="Merges the sampling ('old') adapter into a full-precision regenerator copy and a "
                "low-precision explorer copy (NVFP4 W4A4 emulated / Transformer Engine NVFP4 on Blackwell / "
                "FP8 on Hopper / CPU int8). 'none' keeps only the full-precision copy.",
    inputs=(
        Input("trainer", TRAINER),
        Input("backend", "COMBO", "auto", choices=("auto", *[b for b in BACKENDS if b != "auto"])),
        Input("min_dim", "INT", -1, min=-1, max=1 << 20, optional=True,
              tooltip="Skip layers with max(in, out) <= this; -1: the model family's default."),
        Input("weight_tile", "COMBO", "16x16", choices=("16x16", "1x16"), optional=True),
    ),
    outputs=(Output("trainer", TRAINER),),
    function=requantize_op,
    always_run=True,
))


# --- FP4 Sampler ------------------------------------------------------------------------------
def fp4_sampler_op(trainer, reward, prompts_per_iteration: int, candidates: int, steps: int,
                   precision: str = "low", batch_size: int = 32) -> tuple:
    from ..train.stages import explore

    return (explore(trainer, reward, prompts_per_iteration, candidates, steps, precision, batch_size),)


register(OpSpec(
    id="SolRLFP4Sampler", display_name="FP4 Sampler", category=CAT,
    description="Stage 1, explore: draws N seeds for each of P prompts and generates them with the "
                "low-precision explorer in few steps (no CFG), then scores them with the proxy reward.",
    inputs=(
        Input("trainer", TRAINER),
        Input("reward", REWARD, tooltip="Proxy reward (used only for ranking)."),
        Input("prompts_per_iteration", "INT", 48, min=1, max=4096),
        Input("candidates", "INT", 96, min=1, max=4096, tooltip="N: drafts per prompt."),
        Input("steps", "INT", 6, min=1, max=1000, tooltip="D: draft ODE steps."),
        Input("precision", "COMBO", "low", choices=("low", "full"), optional=True,
              tooltip="full: sample with the full-precision copy (naive scaling / DiffusionNFT baselines)."),
        Input("batch_size", "INT", 32, min=1, max=4096, optional=True, tooltip="Micro-batch for sampling."),
    ),
    outputs=(Output("drafts", SAMPLES),),
    function=fp4_sampler_op,
    always_run=True,
))


# --- Proxy Reward Ranker ----------------------------------------------------------------------
def _check_ranker(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    from ..train.selection import check_sizes

    drafts = linked.get("drafts", {})
    pool = drafts.get("candidates") if drafts.get("class_type") == "SolRLFP4Sampler" else None
    try:
        check_sizes(pool if pool is not None else inputs["keep"], inputs["keep"], inputs["mode"])
    except ValueError as e:
        raise InputError("keep", str(e)) from None


def ranker_op(drafts, keep: int, mode: str) -> tuple:
    from ..train.selection import check_sizes
    from ..train.stages import rank

    try:
        check_sizes(drafts.shape[1], keep, mode)
    except ValueError as e:
        raise InputError("keep", str(e)) from None
    return (rank(drafts, keep, mode),)


register(OpSpec(
    id="SolRLProxyRewardRanker", display_name="Proxy Reward Ranker", category=CAT,
    description="Keeps K of each prompt's N drafts by proxy reward: best_worst (K/2 highest and K/2 lowest), "
                "mean_deviation (K farthest from the mean) or random. Ties go to the earlier draft; drafts "
                "that could not be scored are kept only if too few others remain.",
    inputs=(
        Input("drafts", SAMPLES),
        Input("keep", "INT", 24, min=1, max=4096, tooltip="K: samples kept per prompt."),
        Input("mode", "COMBO", "best_worst", choices=("best_worst", "mean_deviation", "random")),
    ),
    outputs=(Output("kept", SAMPLES),),
    function=ranker_op,
    validate=_check_ranker,
))


# --- BF16 Regenerator -------------------------------------------------------------------------
def regenerator_op(kept, reward, steps: int, batch_size: int = 32, audit_every: int = 0,
                   audit_size: int = 16) -> tuple:
    from ..train.stages import regenerate

    return (regenerate(kept, reward, steps, batch_size, audit_every, audit_size),)


register(OpSpec(
    id="SolRLBF16Regenerator", display_name="BF16 Regenerator", category=CAT,
    description="Stage 2: regenerates exactly the kept seeds with the full-precision sampling policy and F "
                "steps, and scores them: these rewards are the training signal. Every 'audit_every' "
                "iterations it also regenerates a random subset of the whole draft pool and logs how well "
                "the proxy ranked it (Spearman, Kendall, top-k overlap).",
    inputs=(
        Input("kept", SAMPLES),
        Input("reward", REWARD),
        Input("steps", "INT", 10, min=1, max=1000, tooltip="F: full ODE steps."),
        Input("batch_size", "INT", 32, min=1, max=4096, optional=True),
        Input("audit_every", "INT", 0, min=0, max=10**6, optional=True, tooltip="0: no ranking audit."),
        Input("audit_size", "INT", 16, min=2, max=4096, optional=True, tooltip="Drafts per prompt audited."),
    ),
    outputs=(Output("samples", SAMPLES),),
    function=regenerator_op,
    always_run=True,
))


# --- Evaluate ------------------------------------------------------------------------------
def evaluate_op(samples, reward, steps: int, prompts: int, per_prompt: int, every: int) -> tuple:
    from ..train.stages import evaluate

    return (evaluate(samples, reward, steps, prompts, per_prompt, every),)


register(OpSpec(
    id="SolRLEvaluate", display_name="Held-out Reward", category=CAT,
    description="Every 'every' iterations, samples the run's held-out prompts (never trained on: Training Run's "
                "held_out) at fixed seeds with the full-precision "
                "sampling policy and logs their reward (eval_reward_*): a curve free of the prompt-to-prompt "
                "noise of training batches, and a check against reward hacking when its reward differs from "
                "the training one. Samples pass through unchanged.",
    inputs=(
        Input("samples", SAMPLES),
        Input("reward", REWARD, tooltip="Often a different reward than the training one."),
        Input("steps", "INT", 10, min=1, max=1000),
        Input("prompts", "INT", 0, min=0, max=4096,
              tooltip="How many of the run's held-out prompts (Training Run's held_out) to score; 0: all."),
        Input("per_prompt", "INT", 4, min=1, max=1024, tooltip="Fixed seeds per prompt."),
        Input("every", "INT", 1, min=0, max=10**6, tooltip="0: off."),
    ),
    outputs=(Output("samples", SAMPLES),),
    function=evaluate_op,
    always_run=True,
))


# --- NFT Update -------------------------------------------------------------------------------
def nft_update_op(samples, lr: float, beta: float, kl_coef: float, train_fraction: float, grad_clip: float,
                  micro_batch: int, weight_decay: float = 1e-4) -> dict:
    from ..train.stages import UpdateSettings, update

    session = samples.session
    if not samples.prompts:  # the run had already reached total_iterations
        text = f"run complete: {session.iteration}/{session.config.total_iterations} iterations"
        current_context().status(text)
        return {"ui": {"text": [text]}, "result": (session, True, text)}
    settings = UpdateSettings(lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, beta=beta, kl_coef=kl_coef,
                              train_fraction=train_fraction, micro_batch=micro_batch)
    stats = update(samples, settings)
    session.commit(stats)
    row = session.metrics[-1]
    text = (f"iteration {row['iteration'] + 1}/{session.config.total_iterations}: "
            f"reward {row.get('reward_mean', float('nan')):.4f} (drafts {row.get('draft_reward_mean', float('nan')):.4f}), "
            f"loss {row['loss']:.4g}, grad norm {row.get('grad_norm', float('nan')):.3g}, "
            f"dropped {row['dropped']}, backend {row.get('quant_backend', 'none')}")
    current_context().status(text)
    return {"ui": {"text": [text]}, "result": (session, session.done, text)}


register(OpSpec(
    id="SolRLNFTUpdate", display_name="NFT Update", category=CAT,
    description="DiffusionNFT step on the regenerated samples: group-normalised advantages, the NFT loss "
                "with its adaptive weighting and KL to the base model, gradients of all micro-batches and "
                "timesteps accumulated into one optimizer step, then the sampling adapter and EMA follow. "
                "Saves the run state atomically; 'done' turns true at the run's last iteration.",
    inputs=(
        Input("samples", SAMPLES),
        Input("lr", "FLOAT", 3e-4, min=0.0, max=1.0, step=1e-5),
        Input("beta", "FLOAT", 1.0, min=1e-3, max=10.0, step=0.01, tooltip="NFT strength."),
        Input("kl_coef", "FLOAT", 1e-4, min=0.0, max=10.0, step=1e-5, tooltip="KL to the base model (0: off)."),
        Input("train_fraction", "FLOAT", 0.6, min=0.01, max=1.0, step=0.05,
              tooltip="Share of the F rollout timesteps trained per sample (0.6 SANA / SD3.5, 0.4 FLUX.1)."),
        Input("grad_clip", "FLOAT", 1.0, min=0.0, max=1e6, step=0.001),
        Input("micro_batch", "INT", 8, min=1, max=4096, tooltip="Samples per forward pass (memory)."),
        Input("weight_decay", "FLOAT", 1e-4, min=0.0, max=1.0, step=1e-5, optional=True),
    ),
    outputs=(Output("trainer", TRAINER), Output("done", "BOOLEAN"), Output("status", "STRING")),
    function=nft_update_op,
    output_node=True,
    always_run=True,
    trains=True,
))
