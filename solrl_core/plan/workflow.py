"""`python -m solrl_core.run WORKFLOW.json --plan`: a workflow's memory plan, loading no weights.

The model is located as the run would locate it, but only its configs are read; a published repo
id that is not downloaded falls back to the config copy shipped in the package. Reward weights are
not needed either: rewards are sized from their published architectures.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..graph.errors import WorkflowError
from ..graph.validate import validate
from ..graph.workflow import ApiGraph
from ..models.base import ModelNotFoundError
from ..models.loading import detect_family, resolve_source
from ..models.published import PUBLISHED, published_folder
from ..ops.training import DTYPES, _model_source
from ..rewards.registry import parse_reward_spec
from ..train.prompts import load_prompts
from .memory import GIB, IterationShape, MemoryPlan, MemorySettings, plan_memory

# Their checks look for weights, run directories and optional packages, which a plan does not need.
SKIPPED_CHECKS = ("SolRLLoadPolicy", "SolRLLoadReward", "SolRLTrainingRun", "SolRLNFTUpdate")


def _nodes(graph: ApiGraph, class_type: str) -> list[tuple[str, dict]]:
    return [(nid, e["inputs"]) for nid, e in graph.items() if e["class_type"] == class_type]


def _one(graph: ApiGraph, class_type: str, source: str, required: bool = True) -> dict | None:
    found = _nodes(graph, class_type)
    if len(found) > 1:
        raise WorkflowError(f"the memory plan reads one {class_type} node, found {len(found)} "
                            f"({', '.join(n for n, _ in found)})", source=source)
    if not found:
        if required:
            raise WorkflowError(f"the memory plan needs a {class_type} node", source=source)
        return None
    return found[0][1]


def locate_model(model: str, base: str = "") -> tuple[Path, str]:
    """(pipeline folder whose configs describe the model, how it was found)."""
    try:
        root, single = resolve_source(_model_source(model), _model_source(base) if base else None)
    except ModelNotFoundError:
        if model not in PUBLISHED:
            raise
        return published_folder(model), f"{model} is not downloaded here: configs shipped with Sol-RL"
    return root, str(single or root)


def shape_from_workflow(graph: ApiGraph, source: str) -> tuple[IterationShape, dict]:
    """The iteration the workflow asks for, and the Load Policy inputs."""
    policy = _one(graph, "SolRLLoadPolicy", source)
    run = _one(graph, "SolRLTrainingRun", source)
    sampler = _one(graph, "SolRLFP4Sampler", source)
    update = _one(graph, "SolRLNFTUpdate", source)
    ranker = _one(graph, "SolRLProxyRewardRanker", source, required=False)
    regen = _one(graph, "SolRLBF16Regenerator", source, required=False)
    quant = _one(graph, "SolRLRequantize", source, required=False) or {}
    evaluate = _one(graph, "SolRLEvaluate", source, required=False)
    prompt_set = _one(graph, "SolRLPromptSet", source, required=False)
    rewards: list[str] = []
    for nid, inputs in _nodes(graph, "SolRLLoadReward"):
        try:
            rewards += [name for name, _ in parse_reward_spec(inputs["rewards"])]
        except ValueError as e:
            raise WorkflowError(str(e), source=source, node_id=nid, input_name="rewards") from None
    candidates = sampler["candidates"]
    prompts = sampler["prompts_per_iteration"]
    distinct = prompts * run["total_iterations"]
    if prompt_set is not None:
        distinct = min(distinct, len(load_prompts(prompt_set["source"])))
    min_dim = quant.get("min_dim", -1)
    shape = IterationShape(
        prompts=prompts, candidates=candidates, keep=ranker["keep"] if ranker else candidates,
        draft_steps=sampler["steps"], full_steps=regen["steps"] if regen else sampler["steps"],
        explore_batch=sampler["batch_size"], regen_batch=regen["batch_size"] if regen else sampler["batch_size"],
        micro_batch=update["micro_batch"], explore_precision=sampler["precision"], regenerate=regen is not None,
        audit_size=regen["audit_size"] if regen and regen["audit_every"] else 0,
        eval_samples=evaluate["prompts"] * evaluate["per_prompt"] if evaluate and evaluate["every"] else 0,
        eval_batch=evaluate.get("batch_size", 32) if evaluate else 32,
        lora_rank=run["lora_rank"], lora_alpha=run["lora_alpha"], full_finetune=run["full_finetune"],
        backend=quant.get("backend", "none"), min_dim=None if min_dim < 0 else min_dim,
        weight_tile=(16, 16) if quant.get("weight_tile", "16x16") == "16x16" else (1, 16),
        rewards=tuple(rewards), distinct_prompts=distinct)
    return shape, policy


def switches_from_workflow(graph: ApiGraph, source: str) -> dict:
    """The memory switches the workflow sets (train.settings): Training Run's offload_frozen,
    Requantize's regenerator, NFT Update's gradient_checkpointing and optimizer."""
    run = _one(graph, "SolRLTrainingRun", source)
    quant = _one(graph, "SolRLRequantize", source, required=False) or {}
    update = _one(graph, "SolRLNFTUpdate", source)
    return {"offload_frozen": run.get("offload_frozen", False),
            "regenerator": quant.get("regenerator", "merged_copy"),
            "gradient_checkpointing": update.get("gradient_checkpointing", False),
            "optimizer": update.get("optimizer", "adamw")}


def plan_workflow(api: ApiGraph, source: str, gpu_memory_gib: float | None = None, world_size: int | None = None,
                  settings: MemorySettings | None = None) -> MemoryPlan:
    graph = validate(api, source, skip_checks=SKIPPED_CHECKS)
    shape, policy = shape_from_workflow(graph, source)
    folder, found = locate_model(policy["model"], policy.get("base", ""))
    index = json.loads((folder / "model_index.json").read_text())
    family = detect_family(folder, index) if policy["family"] == "auto" else policy["family"]
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dtype = DTYPES[policy["dtype"]] or torch.bfloat16  # "auto" is bf16 on a GPU
    settings = settings or MemorySettings(dtype=dtype, world_size=world, **switches_from_workflow(graph, source))
    if gpu_memory_gib is not None:
        device_bytes = int(gpu_memory_gib * GIB)
    elif torch.cuda.is_available():
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        device_bytes = None
    return plan_memory(folder, family, shape, settings, device_bytes, source=f"{policy['model']} ({found})")


# --- report -----------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def collapse_layers(names: list[str]) -> list[str]:
    """'blocks.0.ff', 'blocks.1.ff', ... -> 'blocks.[0-1].ff (2)': one line per layer kind."""
    groups: dict[str, list[int]] = {}
    for name in names:
        m = re.search(r"\.(\d+)\.", name)
        key = name if m is None else name[:m.start()] + ".#." + name[m.end():]
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
    lines = []
    for key, idx in groups.items():
        if idx == [-1]:
            lines.append(key)
            continue
        span = f"{min(idx)}-{max(idx)}" if len(idx) == max(idx) - min(idx) + 1 else ",".join(map(str, idx))
        lines.append(f"{key.replace('.#.', f'.[{span}].')} ({len(idx)})")
    return lines


def render(plan: MemoryPlan, workflow: str) -> str:
    s = plan.shape
    lines = [
        f"memory plan: {workflow}",
        f"model: {plan.source}",
        f"family {plan.family}, {plan.resolution[0]}x{plan.resolution[1]} px, {plan.settings['dtype']}, "
        f"{plan.settings['world_size']} rank(s): {s['prompts_per_rank']} prompts x {s['candidates']} drafts per rank, "
        f"keep {s['keep']}, batches {s['explore_batch']} / {s['regen_batch']}, micro-batch {s['micro_batch']}",
        f"memory switches: offload_frozen {plan.settings['offload_frozen']}, regenerator "
        f"{plan.settings['regenerator']}, gradient_checkpointing {plan.settings['gradient_checkpointing']}, "
        f"optimizer {plan.settings['optimizer']}; trained weights {plan.settings['trained_dtype']}",
        f"explorer: backend {plan.explorer_backend}, "
        + (f"the whole copy in bf16, held as {plan.explorer_bytes / GIB:.2f} GiB" if plan.explorer_backend == "cpu_bf16"
           else f"{len(plan.quantized_layers)} quantized layers, {plan.quantized_params / 1e9:.3f} B parameters, held "
                f"as {plan.explorer_bytes / GIB:.2f} GiB (bf16 {plan.explorer_bf16_bytes / GIB:.2f} GiB)"),
    ]
    lines += [f"  {line}" for line in collapse_layers(plan.quantized_layers)]
    lines.append(f"peak: stage '{plan.peak_stage}'")
    for name, size in plan.components.items():
        lines.append(f"  {name:22s} {_gib(size)}")
    lines.append(f"  {'total':22s} {_gib(plan.peak_bytes)}")
    lines.append("stages: " + ", ".join(f"{k} {v['total'] / GIB:.1f}" for k, v in plan.stages.items()) + " GiB")
    if plan.device_memory_bytes is None:
        lines.append("fits: unknown (no GPU here; pass --gpu-memory GIB)")
    else:
        margin = plan.device_memory_bytes - plan.peak_bytes
        verdict = "yes" if plan.fits else "no"
        lines.append(f"fits {plan.device_memory_bytes / GIB:.1f} GiB: {verdict} "
                     f"({'spare' if margin >= 0 else 'short by'} {abs(margin) / GIB:.2f} GiB)")
    return "\n".join(lines)


def run_plan(api: ApiGraph, workflow: str, gpu_memory_gib: float | None, as_json: bool,
             world_size: int | None = None) -> int:
    plan = plan_workflow(api, workflow, gpu_memory_gib, world_size)
    print(json.dumps(plan.to_dict(), indent=1) if as_json else render(plan, workflow))
    return 0

