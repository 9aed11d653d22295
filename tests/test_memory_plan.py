"""`--plan`: peak accelerator memory of one iteration from configs alone, by component and stage."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_factories import build_flux, build_sana, save_pipeline
from test_published_models import _expected_layers

from solrl_core.models.published import build_component, published_folder
from solrl_core.models.slices import SLICE_DEPTH
from solrl_core.plan import GIB, IterationShape, MemoryPlan, MemorySettings, plan_memory
from solrl_core.plan import activations as act
from solrl_core.plan.workflow import render
from solrl_core.run import main

ROOT = Path(__file__).resolve().parent.parent


def _plan_json(capsys, *args) -> dict:
    assert main([*args, "--plan", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_flux_workflow_plan(capsys):
    """The bundled FLUX.1 workflow at the paper's settings on 8 ranks (48 prompts: 6 per rank)."""
    d = _plan_json(capsys, str(ROOT / "workflows" / "sol_rl_flux1.json"), "--gpu-memory", "80", "--world-size", "8")
    assert d["family"] == "flux" and d["shape"]["prompts_per_rank"] == 6 and d["resolution"] == [512, 512]
    assert sorted(d["quantized_layers"]) == sorted(_expected_layers("flux"))
    width = 3072  # per double block 36 d^2 (adaLN 2 x 6d^2, attention 8 d^2, feed-forwards 4 x 4d^2), per single 15 d^2
    assert d["quantized_params"] == (19 * 36 + 38 * 15) * width**2
    # Weights are parameter count x bytes per element (bf16 on a GPU; rewards are built in fp32).
    transformer = sum(p.numel() for p in build_component(published_folder("flux"), "transformer").parameters())
    t5 = sum(p.numel() for p in build_component(published_folder("flux"), "text_encoder_2").parameters())
    held = d["holdings"]
    assert held["transformer"] == held["regenerator_copy"] == 2 * transformer
    assert held["explorer_copy"] == 2 * transformer  # Transformer Engine keeps the weights in bf16
    assert held["text_encoder_2"] == 2 * t5
    assert held["reward:pickscore"] == held["reward:hpsv2"] == 4 * d["parameters"]["reward:hpsv2"]
    assert d["parameters"]["reward:hpsv2"] == pytest.approx(986.1e6, rel=1e-3)  # open_clip ViT-H-14
    lora = 32 * (2 * width) * (19 * 4 + 38 * 3)  # rank 32 on to_q / to_k / to_v / to_out.0
    # Trained weights, their gradients, the sampling adapter and the EMA in fp32 on the bf16 model;
    # AdamW's two fp32 moments.
    assert held["trained_adapter"] == held["sampling_adapter"] == held["ema"] == held["gradients"] == 4 * lora
    assert held["optimizer_state"] == 8 * lora
    # The breakdown at the peak sums to the peak; the verdict follows from the given memory.
    assert sum(d["components"].values()) == d["peak_bytes"] == d["stages"][d["peak_stage"]]["total"]
    assert d["device_memory_bytes"] == 80 * GIB and d["fits"] == (d["peak_bytes"] <= 80 * GIB)
    assert "gradients" in d["components"] if d["peak_stage"] == "update" else "gradients" not in d["components"]
    text = render(MemoryPlan(**{k: v for k, v in d.items() if k != "fits"}), "sol_rl_flux1.json")
    assert "single_transformer_blocks.[0-37].proj_out (38)" in text and "fits 80.0 GiB: " in text


def test_quickstart_plan_on_the_embedded_model(capsys):
    """A model without a VAE (pixel space); the quickstart's min_dim 128 explorer: per block the two
    feed-forward 1x1 convolutions (128 -> 640 and 320 -> 128 channels: max > 128) and the cross-attention
    to_k / to_v that SANA's preset names (128 x 128, kept by name): 4 blocks x 4 = 16 layers."""
    d = _plan_json(capsys, str(ROOT / "workflows" / "quickstart.json"), "--gpu-memory", "8")
    assert d["family"] == "sana" and d["resolution"] == [32, 32] and "vae" not in d["holdings"]
    assert len(d["quantized_layers"]) == 16 and d["fits"] is True
    assert d["holdings"]["transformer"] == 2 * d["parameters"]["transformer"]  # bf16 on a GPU


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_pipeline(build_flux(seed=0), tmp_path_factory.mktemp("m") / "flux")


def _workflow(tmp_path, model: str) -> Path:
    from solrl_core.bundled import Recipe, training_graph

    path = tmp_path / "wf.json"
    path.write_text(json.dumps(training_graph(Recipe(model=model, reward="shapes", prompts_per_iteration=4,
                                                     candidates=8, keep=4, batch_size=4, micro_batch=2))))
    return path


def test_plan_reads_no_weights(tmp_path, tiny_flux, capsys):
    """A real folder with unreadable weights and its config-only copy give the same plan."""
    broken = shutil.copytree(tiny_flux, tmp_path / "broken")
    weights = list(broken.rglob("*.safetensors"))
    assert weights
    for w in weights:
        w.write_bytes(b"not a safetensors file")
    configs_only = shutil.copytree(tiny_flux, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    a = _plan_json(capsys, str(_workflow(tmp_path, str(broken))))
    b = _plan_json(capsys, str(_workflow(tmp_path, str(configs_only))))
    for d in (a, b):
        d.pop("source")
    assert a == b and a["family"] == "flux" and a["peak_bytes"] > 0
    assert not (tmp_path / "runs").exists() and not (ROOT / "runs" / "sol_rl").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_flux, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    unknown = shutil.copytree(tiny_flux, tmp_path / "unknown")
    index = json.loads((unknown / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    config = json.loads((unknown / "transformer" / "config.json").read_text())
    (unknown / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    for folder, words in ((empty, "no model_index.json"), (unknown, "cannot tell the model family")):
        workflow = _workflow(tmp_path, str(folder))
        before = sorted(tmp_path.rglob("*"))
        assert main([str(workflow), "--plan"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and str(folder) in err and "\n" not in err and "Traceback" not in err
        assert sorted(tmp_path.rglob("*")) == before  # nothing written
    with pytest.raises(SystemExit) as stop:  # --json goes with --plan (argparse's usage error)
        main([str(_workflow(tmp_path, str(tiny_flux))), "--json"])
    assert stop.value.code == 2 and "go with --plan" in capsys.readouterr().err


def test_memory_switches_move_the_plan_by_what_they_hold(tiny_flux):
    """Each switch of issue 12 is a parameter of the estimate; expected deltas by hand."""
    shape = IterationShape(prompts=2, candidates=8, keep=4, explore_batch=4, regen_batch=4, micro_batch=2,
                           backend="emulated", min_dim=16, rewards=("clipscore",), distinct_prompts=2)
    base = plan_memory(tiny_flux, "flux", shape)
    held = base.holdings

    def stage(plan, name):
        return plan.stages[name]["total"]

    off = plan_memory(tiny_flux, "flux", shape, MemorySettings(offload_frozen=True))
    assert stage(base, "update") - stage(off, "update") == (
        held["text_encoder"] + held["text_encoder_2"] + held["reward:clipscore"] + held["explorer_copy"])
    assert stage(off, "score") == stage(base, "score") - held["text_encoder"] - held["text_encoder_2"] \
        - held["explorer_copy"]
    adapter = plan_memory(tiny_flux, "flux", shape, MemorySettings(regenerator="adapter"))
    assert "regenerator_copy" not in adapter.holdings
    assert stage(base, "update") - stage(adapter, "update") == held["regenerator_copy"]
    bf16 = plan_memory(tiny_flux, "flux", shape, MemorySettings(trained_dtype=torch.bfloat16))  # before issue 12
    for name in ("trained_adapter", "sampling_adapter", "ema", "gradients", "optimizer_state"):
        assert held[name] == 2 * bf16.holdings[name]  # the product trains in fp32 on a bf16 model
    lora = held["trained_adapter"] // 4
    assert plan_memory(tiny_flux, "flux", shape, MemorySettings(optimizer="adamw8bit")).holdings[
        "optimizer_state"] == 2 * lora
    ckpt = plan_memory(tiny_flux, "flux", shape, MemorySettings(gradient_checkpointing=True))
    assert ckpt.stages["update"]["activations"] < base.stages["update"]["activations"]
    emulated_bytes = sum(o * i * 9 // 16 + 4 + 4 * o * i for o, i in _shapes(tiny_flux, shape))
    assert base.explorer_bytes == emulated_bytes  # NVFP4 0.5625 B/element + tensor scale + fp32 cache


def test_cpu_bf16_explorer_is_the_whole_model_at_two_bytes(tiny_flux):
    shape = IterationShape(prompts=2, candidates=8, keep=4, explore_batch=4, regen_batch=4, micro_batch=2,
                           backend="cpu_bf16", min_dim=16, distinct_prompts=2)
    plan = plan_memory(tiny_flux, "flux", shape, MemorySettings(dtype=torch.float32))
    params = plan.parameters["transformer"]
    assert plan.explorer_backend == "cpu_bf16" and plan.quantized_layers == [] and plan.quantized_params == 0
    assert plan.explorer_bytes == plan.holdings["explorer_copy"] == 2 * params
    assert plan.holdings["regenerator_copy"] == 4 * params
    fp32 = plan_memory(tiny_flux, "flux", replace(shape, backend="none"), MemorySettings(dtype=torch.float32))
    assert 0 < plan.stages["explore"]["activations"] < fp32.stages["explore"]["activations"]  # bf16 tensors
    assert f"explorer: backend cpu_bf16, the whole copy in bf16, held as {2 * params / GIB:.2f} GiB\n" in render(plan, "w")


def test_workflow_memory_switches_reach_the_plan(tmp_path, tiny_flux, capsys):
    """The four node settings are the plan's switches: Training Run's offload_frozen, Requantize's
    regenerator, NFT Update's gradient_checkpointing and optimizer (the plan needs no torchao)."""
    from solrl_core.bundled import Recipe, training_graph
    from solrl_core.plan.workflow import shape_from_workflow

    switches = dict(offload_frozen=True, regenerator="adapter", gradient_checkpointing=True, optimizer="adamw8bit")
    path = tmp_path / "switched.json"
    path.write_text(json.dumps(training_graph(Recipe(model=str(tiny_flux), reward="shapes", prompts_per_iteration=4,
                                                     candidates=8, keep=4, batch_size=4, micro_batch=2, **switches))))
    d = _plan_json(capsys, str(path))
    assert {k: d["settings"][k] for k in switches} == switches
    plain = _plan_json(capsys, str(_workflow(tmp_path, str(tiny_flux))))
    assert {k: plain["settings"][k] for k in switches} == {
        "offload_frozen": False, "regenerator": "merged_copy", "gradient_checkpointing": False, "optimizer": "adamw"}
    assert d["peak_bytes"] < plain["peak_bytes"] and "regenerator_copy" not in d["holdings"]
    assert d["holdings"]["optimizer_state"] < plain["holdings"]["optimizer_state"]
    assert d["stages"]["update"]["activations"] < plain["stages"]["update"]["activations"]
    from solrl_core.graph.validate import validate
    from solrl_core.graph.workflow import load_workflow

    shape, _ = shape_from_workflow(validate(load_workflow(str(path))[0], str(path)), str(path))
    expected = plan_memory(tiny_flux, "flux", shape, MemorySettings(**switches))
    assert d["peak_bytes"] == expected.peak_bytes


def _shapes(folder, shape):
    from solrl_core.quant import QuantConfig, select_layers

    model = build_component(folder, "transformer")
    chosen, _ = select_layers(model, QuantConfig.for_family("flux", shape.min_dim))
    return [tuple(m.weight.shape) for m in chosen.values()]


def test_depth_extrapolation_equals_a_full_depth_trace():
    """Traces at the slice depth plus one block of each kind, extrapolated, equal the full trace."""
    folder, options = published_folder("flux"), act.UpdateOptions(lora_rank=4)
    settings = {"resolution": (128, 128), "max_sequence_length": 16}

    def update(depth):
        policy = act.meta_policy(folder, "flux", torch.bfloat16, depth, settings)
        act.prepare_trained(policy, options)
        return act.update_pair_trace(policy, 2, options)

    full = {"num_layers": 3, "num_single_layers": 4}
    assert SLICE_DEPTH["flux"] == {"num_layers": 1, "num_single_layers": 1}
    assert act.by_depth("flux", full, update) == update(full)


def test_traced_activations_match_cpu_measurement():
    """SANA real-width slice on the CPU: resident-memory growth vs the meta-device trace."""
    from solrl_core.plan.measure import run

    for row in run("sana", micro_batch=2, sample_batch=4, resolution=32):
        assert row.measured > 50 * 2**20, row  # real-width activations, well above allocator noise
        assert 0.95 <= row.ratio <= 1.10, row


def test_stages_decode_in_batches(tmp_path):
    """score() decodes in chunks (a pool of full-resolution images at once does not fit a GPU)."""
    from solrl_core.models import load_policy
    from solrl_core.rewards import load_weighted_reward
    from solrl_core.train.session import SessionConfig, TrainingSession
    from solrl_core.train.stages import score

    policy = load_policy(str(save_pipeline(build_sana(seed=1), tmp_path / "sana")), max_sequence_length=8,
                         complex_human_instruction=False)
    session = TrainingSession(tmp_path / "run", policy, ["a red circle"], SessionConfig(lora_rank=2))
    latents = torch.randn(5, *policy.latent_shape())
    reward = load_weighted_reward("jpeg_compressibility")
    whole = score(session, reward, latents, ["a red circle"] * 5)
    calls = []
    decode = policy.decode
    policy.decode = lambda x: (calls.append(x.shape[0]), decode(x))[1]
    chunked = score(session, reward, latents, ["a red circle"] * 5, decode_batch=2)
    assert calls == [2, 2, 1]
    assert chunked[2].shape == whole[2].shape == (5, 3, *policy.image_size_of(latents))
    assert torch.allclose(chunked[2], whole[2], atol=1e-6) and torch.equal(chunked[0], whole[0])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="regenerator"):
        MemorySettings(regenerator="copy")
    with pytest.raises(ValueError, match="optimizer"):
        MemorySettings(optimizer="sgd")
    assert replace(MemorySettings(), world_size=8).world_size == 8
