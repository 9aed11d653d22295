"""Requantize in a training session: in LoRA mode only the adapter-targeted layers are re-quantized,
and the result equals quantizing a fresh merged copy, for every backend that quantizes on CPU."""
from __future__ import annotations

import json
from fnmatch import fnmatch

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


def test_requantize_settings_changed_between_presses_apply(folder, tmp_path):
    """backend, weight_tile and min_dim edited on Requantize while the session lives (ComfyUI keeps it
    between presses) make the explorer again: it equals the explorer a fresh session (or a resumed run)
    makes with the new settings from the same sampling weights."""
    session = _session(folder, tmp_path / "a")
    session.refresh_copies(RequantizeSettings("emulated", min_dim=0))
    counts = []
    for step, settings in enumerate([RequantizeSettings("cpu_int8", min_dim=0),
                                     RequantizeSettings("emulated", min_dim=0, weight_tile="1x16"),
                                     RequantizeSettings("emulated", min_dim=16)], start=1):
        moved = _move_sampling_weights(session)
        session.iteration = step
        copies = session.refresh_copies(settings)
        other = _session(folder, tmp_path / f"fresh{step}")
        load_adapter_state(other.policy.transformer, SAMPLING, moved)
        fresh = other.refresh_copies(settings)
        got, want = _weights(copies.explorer), _weights(fresh.explorer)
        assert got.keys() == want.keys() and [k for k in want if not torch.equal(got[k], want[k])] == []
        got, want = copies.regenerator.state_dict(), fresh.regenerator.state_dict()  # refreshed too
        assert got.keys() == want.keys() and [k for k in want if not torch.equal(got[k], want[k])] == []
        assert session.pending["quant_backend"] == settings.backend
        report = json.loads((tmp_path / "a" / "quant_report.json").read_text())
        assert report["backend"] == settings.backend and report["quantized"] == fresh.quant_report["quantized"]
        counts.append(len(report["quantized"]))
    # min_dim 16 skips the layers with max(in, out) <= 16 (spec: algorithm section 4), which min_dim 0 kept,
    # except those SANA's preset quantizes by name (cross-attention to_k / to_v).
    small = [r["name"] for r in report["quantized"] if max(r["in_features"], r["out_features"]) <= 16]
    assert all(fnmatch(name, "*attn2.to_[kv]") for name in small), small
    assert 0 < counts[2] < counts[0] == counts[1]
    session.iteration += 1
    assert session.refresh_copies(RequantizeSettings("none")).explorer is None
    with pytest.raises(RuntimeError, match="backend 'none'"), session.sampling_model("low"):
        pass
    assert json.loads((tmp_path / "a" / "quant_report.json").read_text())["backend"] == "none"


@pytest.mark.parametrize("full_finetune", [False, True])
def test_cpu_bf16_explorer_follows_the_sampling_weights(folder, tmp_path, monkeypatch, full_finetune):
    """The cpu_bf16 explorer is the merged copy rounded to bf16, after every refresh: equal, tensor for
    tensor, to the full-precision regenerator cast to bf16; and sampling through it is close to full
    precision (bf16's unit roundoff is 2**-8)."""
    from solrl_core.quant import backends

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: True)
    session = _session(folder, tmp_path / "a", full_finetune=full_finetune)
    for step in range(2):
        if step:
            _move_sampling_weights(session)
            session.iteration += 1
        copies = session.refresh_copies(RequantizeSettings("cpu_bf16"))
        regen, explorer = copies.regenerator.state_dict(), copies.explorer.state_dict()
        assert regen.keys() == explorer.keys()
        assert [k for k in regen if not torch.equal(explorer[k], regen[k].to(explorer[k].dtype))] == []
        assert {v.dtype for v in explorer.values() if v.is_floating_point()} == {torch.bfloat16}
    policy = session.policy
    cond = policy.encode(PROMPTS)
    x, sigma = policy.initial_noise([0, 1]), torch.full((2,), 0.5)
    with torch.no_grad():
        low, full = (policy.velocity(m, x, sigma, cond) for m in (copies.explorer, copies.regenerator))
    assert low.dtype == torch.float32 and 0 < ((low - full).norm() / full.norm()).item() < 0.05
