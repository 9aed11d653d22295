"""Requantize in a training session: in LoRA mode only the adapter-targeted layers are re-quantized,
and the result equals quantizing a fresh merged copy, for every backend that quantizes on CPU."""
from __future__ import annotations

import pytest
import torch
from model_factories import build_sana, save_pipeline

from solrl_core.models import adapter_state, load_adapter_state, load_policy
from solrl_core.models.lora import SAMPLING, lora_layers
from solrl_core.quant.layers import QuantizedLayer
from solrl_core.train.session import TrainingSession
from solrl_core.train.settings import RequantizeSettings, SessionConfig

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(build_sana(seed=3, with_vae=False, sample_size=8), tmp_path_factory.mktemp("m") / "pix")


def _session(folder, run_dir, full_finetune: bool = False) -> TrainingSession:
    config = SessionConfig(lora_rank=4, lora_alpha=8.0, full_finetune=full_finetune)
    return TrainingSession(run_dir, load_policy(str(folder)), PROMPTS, config)


def _move_sampling_weights(session: TrainingSession) -> dict[str, torch.Tensor]:
    """Give the sampling weights new values (as after an update and the old-adapter decay)."""
    g = torch.Generator().manual_seed(0)
    model = session.policy.transformer
    moved = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model, SAMPLING).items()}
    load_adapter_state(model, SAMPLING, moved)
    return moved


@pytest.mark.parametrize("backend", ["emulated", "cpu_int8"])
def test_lora_refresh_equals_quantizing_a_fresh_merged_copy(folder, tmp_path, backend):
    session = _session(folder, tmp_path / "a")
    first = session.refresh_copies(RequantizeSettings(backend, min_dim=0))
    before = _weights(first.explorer)
    refreshed_layers = []
    for name, layer in first.explorer.named_modules():
        if isinstance(layer, QuantizedLayer):  # record which layers re-quantize themselves
            layer.refresh = (lambda f, n: lambda *a: (refreshed_layers.append(n), f(*a)))(layer.refresh, name)
    model = session.policy.transformer
    moved = _move_sampling_weights(session)
    session.iteration += 1
    refreshed = _weights(session.refresh_copies(RequantizeSettings(backend, min_dim=0)).explorer)

    other = _session(folder, tmp_path / "b")
    load_adapter_state(other.policy.transformer, SAMPLING, moved)
    fresh = _weights(other.refresh_copies(RequantizeSettings(backend, min_dim=0)).explorer)  # quantized from scratch

    assert refreshed.keys() == fresh.keys() and any(k.startswith("quantized:") for k in fresh)
    assert [k for k in fresh if not torch.equal(refreshed[k], fresh[k])] == []
    changed = [k for k in fresh if not torch.equal(refreshed[k], before[k])]
    targeted = {n for n, _ in lora_layers(model)}
    # Only adapter-targeted layers moved: quantized ones, and those the preset keeps in high precision
    # (SANA's self-attention to_q / to_k / to_v).
    owners = {k.removeprefix("quantized:").removesuffix(".weight").removesuffix(".bias") for k in changed}
    assert any(k.startswith("quantized:") for k in changed) and owners <= targeted
    assert sorted(refreshed_layers) == sorted(n for n in targeted if f"quantized:{n}" in fresh)
    assert len(refreshed_layers) < sum(k.startswith("quantized:") for k in fresh)  # the others were left alone


def test_full_finetune_requantizes_the_whole_explorer(folder, tmp_path):
    session = _session(folder, tmp_path / "a", full_finetune=True)
    before = _weights(session.refresh_copies(RequantizeSettings("emulated", min_dim=0)).explorer)
    moved = _move_sampling_weights(session)
    session.iteration += 1
    refreshed = _weights(session.refresh_copies(RequantizeSettings("emulated", min_dim=0)).explorer)
    other = _session(folder, tmp_path / "b", full_finetune=True)
    load_adapter_state(other.policy.transformer, SAMPLING, moved)
    fresh = _weights(other.refresh_copies(RequantizeSettings("emulated", min_dim=0)).explorer)
    assert [k for k in fresh if not torch.equal(refreshed[k], fresh[k])] == []
    changed = [k for k in fresh if not torch.equal(refreshed[k], before[k])]
    assert sum(k.startswith("quantized:") for k in changed) == sum(k.startswith("quantized:") for k in fresh)


def _weights(explorer) -> dict[str, torch.Tensor]:
    """Every tensor an explorer computes with: quantized layers by their effective weight."""
    out = {f"quantized:{n}": m.dequantized_weight().clone() for n, m in explorer.named_modules()
           if isinstance(m, QuantizedLayer)}
    prefixes = tuple(n.removeprefix("quantized:") + "." for n in out)
    out.update({k: v.clone() for k, v in explorer.state_dict().items() if not k.startswith(prefixes)})
    return out
