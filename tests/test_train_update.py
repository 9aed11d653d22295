"""NFT Update inside a training session, with the trained, sampling and EMA weights all different (as
they are after a few iterations), so that a blend or a copy taken from the wrong adapter shows."""
from __future__ import annotations

import pytest
import torch
from model_factories import build_sana, save_pipeline

from solrl_core.models import adapter_state, adapters_disabled, load_adapter_state, load_policy, use_adapter
from solrl_core.models.lora import SAMPLING, TRAINED
from solrl_core.sampling import sample
from solrl_core.train.samples import SampleBatch
from solrl_core.train.session import TrainingSession
from solrl_core.train.settings import RegenerateSettings, RequantizeSettings, SessionConfig, UpdateSettings
from solrl_core.train.stages import regenerate, update

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(build_sana(seed=5, with_vae=False, sample_size=8), tmp_path_factory.mktemp("m") / "pix")


def _distinct_session(folder, run_dir, **config) -> tuple[TrainingSession, dict, dict, dict]:
    """A session whose trained (A), sampling (B) and EMA (C) weights differ from each other and from
    the base model (LoRA B matrices non-zero)."""
    config = SessionConfig(lora_rank=4, lora_alpha=8.0, **config)
    session = TrainingSession(run_dir, load_policy(str(folder)), PROMPTS, config)
    model = session.policy.transformer
    g = torch.Generator().manual_seed(11)
    init = adapter_state(model, TRAINED)
    a = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    b = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    c = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    load_adapter_state(model, TRAINED, a)
    load_adapter_state(model, SAMPLING, b)
    session.ema = {k: v.clone() for k, v in c.items()}
    return session, a, b, c


def _batch(session: TrainingSession) -> SampleBatch:
    """Two prompts x two regenerated samples (pixel-space latents 3 x 8 x 8) with distinct rewards."""
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 2, 3, 8, 8, generator=g).clamp(-1, 1)
    rewards = torch.tensor([[0.0, 1.0], [0.2, 0.6]])
    return SampleBatch(session, list(PROMPTS), torch.tensor([[1, 2], [3, 4]]), latents, rewards, steps=3,
                       prompt_ids=[0, 1])


@pytest.mark.parametrize("iteration, old_d, ema_d", [
    (0, 0.001, 2 / 11),    # first update: step 1 -> d = min(0.001 * 1, 0.5), EMA (1 + 1) / (10 + 1)
    (9, 0.01, 11 / 20),    # tenth update: step 10 -> d = 0.001 * 10, EMA (1 + 10) / (10 + 10)
])
def test_sampling_adapter_and_ema_count_steps_from_one(folder, tmp_path, iteration, old_d, ema_d):
    session, a, b, c = _distinct_session(folder, tmp_path / "run")
    session.iteration = iteration
    stats = update(_batch(session), UpdateSettings(lr=0.0, kl_coef=0.0, micro_batch=4))
    assert stats["stepped"] == 1 and stats["grad_norm"] > 0
    model = session.policy.transformer
    trained = adapter_state(model, TRAINED)
    assert all(torch.equal(trained[k], a[k]) for k in a)  # lr 0: the trained adapter did not move
    old = adapter_state(model, SAMPLING)
    for k in a:  # old <- d * old + (1 - d) * current; EMA likewise with its own decay
        torch.testing.assert_close(old[k], old_d * b[k] + (1 - old_d) * a[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(session.ema[k], ema_d * c[k] + (1 - ema_d) * a[k], rtol=1e-6, atol=1e-7)


class MeanBrightness:
    """A reward that needs no weights: the mean pixel value of each image."""

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)), {}


def _sampled_through(session: TrainingSession, weights: str, seeds: torch.Tensor, steps: int) -> torch.Tensor:
    """Latents [P, M, ...] sampled through the trained model itself with one adapter active ("base": none)."""
    policy, model = session.policy, session.policy.transformer
    cond = policy.encode([p for p in PROMPTS for _ in range(seeds.shape[1])])
    with adapters_disabled(model) if weights == "base" else use_adapter(model, weights):
        x0 = sample(policy, model, cond, seeds.flatten().tolist(), steps)
    return x0.reshape(*seeds.shape, *x0.shape[1:])


def test_zero_learning_rate_moves_only_the_sampling_blend_and_copies_follow_it(folder, tmp_path):
    """lr 0 late in a run (step 500 and 501: old decay 0.5, EMA decay 0.9), with trained A, sampling B,
    EMA C and base all different: the trained adapter and the base weights stay bit-identical, the
    sampling adapter and EMA follow the spec's blend, and the regenerator samples with exactly the
    sampling adapter (not the trained one, not the base) both when built and when refreshed."""
    session, a, b, c = _distinct_session(folder, tmp_path / "run", total_iterations=1000)
    model = session.policy.transformer
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    session.iteration = 499
    seeds = torch.tensor([[11, 12], [13, 14]])
    for _ in range(2):
        # Built on the first pass, refreshed in place on the second.
        session.refresh_copies(RequantizeSettings(backend="none"))
        kept = SampleBatch(session, list(PROMPTS), seeds, torch.zeros(2, 2, 3, 8, 8), torch.zeros(2, 2), steps=3,
                           prompt_ids=[0, 1])
        out = regenerate(kept, MeanBrightness(), RegenerateSettings(steps=3))
        torch.testing.assert_close(out.latents, _sampled_through(session, SAMPLING, seeds, 3), rtol=0, atol=1e-5)
        for other in (TRAINED, "base"):  # a copy of the wrong weights would be this far off
            assert (out.latents - _sampled_through(session, other, seeds, 3)).abs().max() > 1e-2, other
        session.commit(update(out, UpdateSettings(lr=0.0, kl_coef=0.0, micro_batch=4)))
    assert session.iteration == 501 and all(r["stepped"] == 1 for r in session.metrics)
    assert all(torch.equal(adapter_state(model, TRAINED)[k], a[k]) for k in a)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if ".lora_" not in n)
    old = adapter_state(model, SAMPLING)
    for k in a:
        # old: 0.5 B + 0.5 A after step 500, then 0.5 (0.5 B + 0.5 A) + 0.5 A = 0.25 B + 0.75 A.
        torch.testing.assert_close(old[k], 0.25 * b[k] + 0.75 * a[k], rtol=1e-6, atol=1e-7)
        # EMA: 0.9 C + 0.1 A, then 0.9 (0.9 C + 0.1 A) + 0.1 A = 0.81 C + 0.19 A.
        torch.testing.assert_close(session.ema[k], 0.81 * c[k] + 0.19 * a[k], rtol=1e-6, atol=1e-7)
