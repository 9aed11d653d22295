"""The Sol-RL nodes: loaders, Training Run, Requantize, FP4 Sampler, Proxy Reward Ranker,
BF16 Regenerator and NFT Update. Thin: the work is in solrl_core.train."""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..runtime.context import MODEL_FOLDER_KINDS, REWARD_FOLDER_KINDS, current_context
from ..runtime.files import check_writable
from ..runtime.metrics import metrics_log
from ..runtime.settings import SettingError
from ..runtime.sinks import LOG_TO, attach_sinks, check_sinks
from ..train.settings import (
    EvaluateSettings,
    ExploreSettings,
    RegenerateSettings,
    RequantizeSettings,
    SelectSettings,
    SessionConfig,
    UpdateSettings,
)
from .registry import register
from .spec import Input, InputError, OpSpec, Output

POLICY, REWARD, PROMPTS = "SOLRL_POLICY", "SOLRL_REWARD", "SOLRL_PROMPTS"
SESSION, SAMPLES = "SOLRL_SESSION", "SOLRL_SAMPLES"
CAT = "Sol-RL"
# NFT Update's required widgets, in their order on the node (the AdamW betas and epsilon stay at
# the reference's values and are set from Python only).
NFT_UPDATE_INPUTS = ("lr", "beta", "kl_coef", "train_fraction", "grad_clip", "micro_batch")
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
    from ..train.checkpoint import CheckpointError, latest_checkpoint
    from ..train.session import resumable_checkpoint

    try:
        check_sinks(inputs.get("log_to", "metrics.jsonl"))
    except ImportError as e:
        raise InputError("log_to", str(e)) from None
    ctx = current_context()
    run_dir = Path(ctx.run_dir or ctx.runs_root / inputs.get("run_name", "sol_rl"))
    try:
        check_writable(run_dir)
    except PermissionError as e:
        raise InputError("run_name", str(e)) from None
    if inputs.get("mode", "continue") == "continue":  # what resuming would refuse, refused before compute
        names = [f.name for f in fields(SessionConfig)]
        try:
            if all(n in inputs for n in names):
                resumable_checkpoint(run_dir, SessionConfig(**{n: inputs[n] for n in names}))
            else:  # some run settings are linked: their values are known only when the run opens
                latest_checkpoint(run_dir)
        except CheckpointError as e:
            raise InputError("mode", str(e)) from None
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


def training_run_op(policy, prompts: list[str], run_name: str, mode: str, log_to: str = "metrics.jsonl",
                    **settings) -> tuple:
    from ..train.session import open_session

    ctx = current_context()
    run_dir = ctx.run_dir or ctx.runs_root / run_name
    config = SessionConfig(**settings)
    session = open_session(Path(run_dir), policy, prompts, config, mode=mode)
    attach_sinks(metrics_log(run_dir), log_to, config=asdict(config))
    ctx.status(f"run {run_dir}: iteration {session.iteration} of {config.total_iterations}")
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
        Input.of(SessionConfig, "seed", seed=True),
        *(Input.of(SessionConfig, name) for name in ("total_iterations", "lora_rank", "lora_alpha", "full_finetune")),
        Input("log_to", "COMBO", "metrics.jsonl", choices=LOG_TO, optional=True,
              tooltip="Also write every metrics row and the previews as TensorBoard event files (tensorboard/) "
                      "and / or an offline Weights & Biases run (wandb/) in the run's folder; each needs its "
                      "package."),
        Input.of(SessionConfig, "offload_frozen", optional=True),
        Input.of(SessionConfig, "held_out", optional=True),
    ),
    outputs=(Output("session", SESSION),),
    function=training_run_op,
    always_run=True,  # re-queueing must continue training, never replay a cached result
    validate=_check_run,
    settings=SessionConfig,
    trains=True,  # creates the trainable adapters
))


# --- Requantize -------------------------------------------------------------------------------
def requantize_op(session, **settings) -> tuple:
    copies = session.refresh_copies(RequantizeSettings(**settings))
    current_context().status(f"iteration {session.iteration}: explorer backend {copies.backend} "
                             f"({copies.backend_reason})")
    return (session,)


register(OpSpec(
    id="SolRLRequantize", display_name="Requantize", category=CAT,
    description="Merges the sampling ('old') adapter into a full-precision regenerator copy and a "
                "low-precision explorer copy (NVFP4 W4A4 emulated / Transformer Engine NVFP4 on Blackwell / "
                "FP8 on Hopper / CPU int8). 'none' keeps only the full-precision copy.",
    inputs=(
        Input("session", SESSION),
        Input.of(RequantizeSettings, "backend"),
        Input.of(RequantizeSettings, "min_dim", optional=True),
        Input.of(RequantizeSettings, "weight_tile", optional=True),
        Input.of(RequantizeSettings, "regenerator", optional=True),
    ),
    outputs=(Output("session", SESSION),),
    function=requantize_op,
    always_run=True,
    settings=RequantizeSettings,
))


# --- FP4 Sampler ------------------------------------------------------------------------------
def fp4_sampler_op(session, reward, **settings) -> tuple:
    from ..train.stages import explore

    return (explore(session, reward, ExploreSettings(**settings)),)


register(OpSpec(
    id="SolRLFP4Sampler", display_name="FP4 Sampler", category=CAT,
    description="Stage 1, explore: draws N seeds for each of P prompts and generates them with the "
                "low-precision explorer in few steps (no CFG), then scores them with the proxy reward.",
    inputs=(
        Input("session", SESSION),
        Input("reward", REWARD, tooltip="Proxy reward (used only for ranking)."),
        *(Input.of(ExploreSettings, name) for name in ("prompts_per_iteration", "candidates", "steps")),
        *(Input.of(ExploreSettings, name, optional=True) for name in ("precision", "batch_size")),
    ),
    outputs=(Output("drafts", SAMPLES),),
    function=fp4_sampler_op,
    always_run=True,
    settings=ExploreSettings,
))


# --- Proxy Reward Ranker ----------------------------------------------------------------------
def _check_ranker(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    """K against the pool size N of the FP4 Sampler feeding it (K's own rules ran as settings)."""
    drafts = linked.get("drafts", {})
    if drafts.get("class_type") == "SolRLFP4Sampler" and "candidates" in drafts:
        try:
            kept = SelectSettings(**{k: v for k, v in inputs.items() if k in ("keep", "mode")})
            kept.check(candidates=drafts["candidates"])
        except SettingError as e:
            raise InputError(e.name, e.detail) from None


def ranker_op(drafts, **settings) -> tuple:
    from ..train.stages import select

    return (select(drafts, SelectSettings(**settings)),)


register(OpSpec(
    id="SolRLProxyRewardRanker", display_name="Proxy Reward Ranker", category=CAT,
    description="Keeps K of each prompt's N drafts by proxy reward: best_worst (K/2 highest and K/2 lowest), "
                "mean_deviation (K farthest from the mean) or random. Ties go to the earlier draft; drafts "
                "that could not be scored are kept only if too few others remain.",
    inputs=(
        Input("drafts", SAMPLES),
        Input.of(SelectSettings, "keep"),
        Input.of(SelectSettings, "mode"),
    ),
    outputs=(Output("kept", SAMPLES),),
    function=ranker_op,
    validate=_check_ranker,
    settings=SelectSettings,
))


# --- BF16 Regenerator -------------------------------------------------------------------------
def regenerator_op(kept, reward, **settings) -> tuple:
    from ..train.stages import regenerate

    return (regenerate(kept, reward, RegenerateSettings(**settings)),)


register(OpSpec(
    id="SolRLBF16Regenerator", display_name="BF16 Regenerator", category=CAT,
    description="Stage 2: regenerates exactly the kept seeds with the full-precision sampling policy and F "
                "steps, and scores them: these rewards are the training signal. Every 'audit_every' "
                "iterations it also regenerates a random subset of the whole draft pool and logs how well "
                "the proxy ranked it (Spearman, Kendall, top-k overlap).",
    inputs=(
        Input("kept", SAMPLES),
        Input("reward", REWARD),
        Input.of(RegenerateSettings, "steps"),
        *(Input.of(RegenerateSettings, name, optional=True) for name in ("batch_size", "audit_every", "audit_size")),
    ),
    outputs=(Output("samples", SAMPLES),),
    function=regenerator_op,
    always_run=True,
    settings=RegenerateSettings,
))


# --- Evaluate ------------------------------------------------------------------------------
def evaluate_op(samples, reward, **settings) -> tuple:
    from ..train.stages import evaluate

    return (evaluate(samples, reward, EvaluateSettings(**settings)),)


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
        *(Input.of(EvaluateSettings, name) for name in ("steps", "prompts", "per_prompt", "every")),
    ),
    outputs=(Output("samples", SAMPLES),),
    function=evaluate_op,
    always_run=True,
    settings=EvaluateSettings,
))


# --- NFT Update -------------------------------------------------------------------------------
def _check_update(inputs: dict[str, Any], linked: dict[str, dict]) -> None:
    from ..train.optimizers import missing_package

    problem = missing_package(inputs.get("optimizer", "adamw"))
    if problem:
        raise InputError("optimizer", problem)


def nft_update_op(samples, **settings) -> dict:
    from ..train.stages import update

    session = samples.session
    if not samples.prompts:  # the run had already reached total_iterations
        text = f"run complete: {session.iteration}/{session.config.total_iterations} iterations"
        current_context().status(text)
        return {"ui": {"text": [text]}, "result": (session, True, text)}
    stats = update(samples, UpdateSettings(**settings))
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
        *(Input.of(UpdateSettings, name) for name in NFT_UPDATE_INPUTS),
        *(Input.of(UpdateSettings, name, optional=True)
          for name in ("weight_decay", "gradient_checkpointing", "optimizer")),
    ),
    outputs=(Output("session", SESSION), Output("done", "BOOLEAN"), Output("status", "STRING")),
    function=nft_update_op,
    validate=_check_update,
    output_node=True,
    always_run=True,
    trains=True,
    settings=UpdateSettings,
))
