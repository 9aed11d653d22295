"""A whole Sol-RL iteration on real-width slices (published widths and heads, one block, random
weights) on the CPU, with the emulated NVFP4 and the cpu_int8 explorers at the real thresholds, and
the cpu_bf16 one where the CPU has native bf16."""
from __future__ import annotations

import math

import pytest
import torch
from test_published_models import _expected_layers

from solrl_core.models import adapter_state
from solrl_core.models.published import component_config, published_folder
from solrl_core.models.slices import ONE_BLOCK, SLICE_DEPTH, build_slice
from solrl_core.quant.backends import cpu_has_native_bf16
from solrl_core.rewards import load_weighted_reward
from solrl_core.train import settings as st
from solrl_core.train.session import SAMPLING, TRAINED, TrainingSession
from solrl_core.train.stages import explore, regenerate, select, update

# The default suite runs one block per family (ONE_BLOCK); the slow suite the slice depth
# (FLUX.1 one double- and one single-stream block, SD3.5 two blocks).
PROMPTS = ["a red circle", "two blue squares"]


def _slice_layers(family: str, depth: dict[str, int]) -> list[str]:
    """The reference preset's layers that exist in a slice of `depth` blocks (SD3.5's last block
    quantizes the same two feed-forward layers as the others)."""
    kept = []
    for name in _expected_layers(family):
        kind, index = name.split(".")[0], int(name.split(".")[1])
        limit = depth["num_single_layers"] if kind == "single_transformer_blocks" else depth["num_layers"]
        if index < limit:
            kept.append(name)
    return sorted(kept)


def _iteration(policy, backend: str, tmp_path) -> tuple[TrainingSession, dict]:
    session = TrainingSession(tmp_path / backend, policy, PROMPTS, st.SessionConfig(lora_rank=4, lora_alpha=4.0))
    reward = load_weighted_reward("jpeg_compressibility")
    copies = session.refresh_copies(st.RequantizeSettings(backend))  # the family's preset: real thresholds
    drafts = explore(session, reward, st.ExploreSettings(prompts_per_iteration=1, candidates=4, steps=1, batch_size=4))
    draft_shape = tuple(drafts.latents.shape)  # (the batches are released when the iteration commits)
    kept = select(drafts, st.SelectSettings(keep=2))
    samples = regenerate(kept, reward, st.RegenerateSettings(steps=2, batch_size=2))
    before = {"trained": adapter_state(policy.transformer, TRAINED), "sampling": adapter_state(policy.transformer, SAMPLING)}
    stats = update(samples, st.UpdateSettings(micro_batch=2, train_fraction=0.6))
    session.commit(stats)
    return session, {"copies": copies, "drafts": drafts, "draft_shape": draft_shape, "samples": samples,
                     "stats": stats, "before": before}


def _check_iteration(family: str, depth: dict[str, int], tmp_path) -> None:
    policy = build_slice(family, depth=depth, resolution=(16, 16))
    every = sorted(n for n, m in policy.transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    config, published = policy.transformer.config, component_config(published_folder(family), "transformer")
    for key in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "caption_channels",
                "cross_attention_dim", "pooled_projection_dim"):
        if key in published:
            assert config[key] == published[key], key  # real widths and heads
    cond = policy.encode(PROMPTS)
    shape = policy.conditioning_shape()  # the real conditioning widths reach the transformer
    assert tuple(cond.embeds.shape) == (2, shape.tokens, shape.width)
    assert (cond.pooled is None and shape.pooled is None) or tuple(cond.pooled.shape) == (2, shape.pooled)
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.7)
    for backend in ("emulated", "cpu_int8", *(("cpu_bf16",) if cpu_has_native_bf16() else ())):
        session, out = _iteration(policy, backend, tmp_path)
        report = out["copies"].quant_report
        names = sorted(r["name"] for r in report["quantized"])
        errors = [r["rel_error"] for r in report["quantized"]]
        if backend == "cpu_bf16":  # the whole copy: every linear and convolution, bf16's unit roundoff
            assert names == every and all(0 < e <= 2**-8 for e in errors)
        else:
            assert names == _slice_layers(family, depth), backend  # real shapes, real thresholds
        if backend == "cpu_int8":
            # Per-row int8 of uniform weights (PyTorch's default init): RMS error amax/127/sqrt(12)
            # over RMS amax/sqrt(3) = 1/254.
            assert all(e == pytest.approx(1 / 254, rel=0.05) for e in errors), errors
        elif backend == "emulated":
            assert all(0.08 < e < 0.15 for e in errors), errors  # NVFP4: 4-bit elements, E4M3 block scales
        with torch.no_grad():
            full = policy.velocity(out["copies"].regenerator, x, sigma, cond)
            low = policy.velocity(out["copies"].explorer, x, sigma, cond)
        rel = ((low - full).norm() / full.norm()).item()
        assert 0 < rel < {"emulated": 0.1, "cpu_int8": 0.01, "cpu_bf16": 0.02}[backend], (backend, rel)
        stats = out["stats"]
        assert stats["stepped"] == 1 and math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
        assert out["drafts"].precision == "low" and out["samples"].precision == "full"
        assert out["draft_shape"] == (1, 4, *policy.latent_shape())
        row = session.metrics[-1]
        assert row["quant_backend"] == backend and row["iteration"] == 0 and math.isfinite(row["reward_mean"])
        after_trained = adapter_state(policy.transformer, TRAINED)
        after_sampling = adapter_state(policy.transformer, SAMPLING)
        assert any(not torch.equal(after_trained[k], v) for k, v in out["before"]["trained"].items())
        # old <- d * old + (1 - d) * current with d = min(0.001 * 1, 0.5) after the first step
        for k, old in out["before"]["sampling"].items():
            assert torch.allclose(after_sampling[k], 0.001 * old + 0.999 * after_trained[k], atol=1e-6)


@pytest.mark.parametrize("family", ["sana", "flux", "sd3"])
def test_iteration_on_a_one_block_slice(family, tmp_path):
    _check_iteration(family, ONE_BLOCK[family], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_iteration_on_the_slice_depth(family, tmp_path):
    _check_iteration(family, SLICE_DEPTH[family], tmp_path)
