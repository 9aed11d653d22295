"""`load_policy("embedded")`: the pixel-space tiny SANA model shipped in the package."""
from __future__ import annotations

import pytest
import torch
from model_factories import build_sana, save_pipeline

from solrl_core.models import ModelNotFoundError, load_policy, loading
from solrl_core.sampling import sample


def test_embedded_resolves_to_the_package_folder(tmp_path, monkeypatch):
    folder = save_pipeline(build_sana(seed=5, with_vae=False, sample_size=16), tmp_path / "weights")
    monkeypatch.setattr(loading, "EMBEDDED_DIR", folder)
    policy = load_policy("embedded")
    assert policy.family == "sana" and policy.vae is None and policy.latent_shape() == (3, 16, 16)
    assert policy.complex_human_instruction == ()  # off without a VAE
    x0 = sample(policy, policy.transformer, policy.encode(["a red circle"]), [3], 2)
    assert x0.shape == (1, 3, 16, 16) and torch.isfinite(x0).all()


def test_missing_embedded_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "EMBEDDED_DIR", tmp_path / "absent")
    with pytest.raises(ModelNotFoundError) as err:
        load_policy("embedded")
    assert "\n" not in str(err.value) and "model_index.json" in str(err.value) and "absent" in str(err.value)


@pytest.mark.skipif(not (loading.EMBEDDED_DIR / "model_index.json").is_file(), reason="tiny model not built yet")
def test_shipped_tiny_model_through_the_adapter_matches_its_training_conventions():
    from solrl_core.models.tiny import TinyModel
    from solrl_core.models.tiny import sample as tiny_sample

    policy = load_policy("embedded")
    assert policy.latent_shape() == (3, 32, 32) and policy.resolution == (32, 32)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    theirs = tiny_sample(TinyModel.from_pretrained(loading.EMBEDDED_DIR), prompts, seeds, steps=4)
    # TinyModel encodes and calls the transformer as the training script does; its previews use the
    # scheduler's grid (1 ... 1/1000, 0): pass it to compare the same ODE discretisation
    from solrl_core.models.schedules import scheduler_sigmas

    sigmas = scheduler_sigmas(policy.scheduler, 4)
    ours = sample(policy, policy.transformer, policy.encode(prompts), seeds, 4, solver="euler", sigmas=sigmas)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_settings_file_next_to_model_index_configures_the_adapter(tmp_path):
    import json

    folder = save_pipeline(build_sana(seed=7, with_vae=True, sample_size=8), tmp_path / "sana")
    assert load_policy(str(folder)).complex_human_instruction  # a SANA with a VAE: instruction on by default
    (folder / loading.SETTINGS_FILE).write_text(json.dumps(
        {"complex_human_instruction": False, "max_sequence_length": 8, "resolution": [32, 48]}))
    policy = load_policy(str(folder))
    assert policy.complex_human_instruction == () and policy.max_sequence_length == 8
    assert policy.resolution == (32, 48) and policy.latent_shape() == (4, 16, 24)
    assert policy.encode(["a red circle"]).embeds.shape[1] == 8
    assert load_policy(str(folder), max_sequence_length=12).max_sequence_length == 12  # kwargs win
