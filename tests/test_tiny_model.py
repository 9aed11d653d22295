"""The embedded tiny model: tokenizer, shipped weights, determinism, training, acceptance figures."""
from __future__ import annotations

import json

import pytest
import torch

from solrl_core.models import load_policy
from solrl_core.models.loading import EMBEDDED_DIR
from solrl_core.models.tiny import TinyModel, build_tokenizer
from solrl_core.models.tiny.evaluate import evaluate, weights_size_bytes
from solrl_core.models.tiny.train import TrainConfig, train
from solrl_core.sampling import sample
from solrl_core.scenes import KINDS, all_specs, caption

MAX_WEIGHT_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def policy():
    return load_policy("embedded")


def _check_word_tokens(tok) -> None:
    unk = tok.convert_tokens_to_ids("<unk>")
    for kind in KINDS:
        for spec in all_specs(kind):
            prompt = caption(spec)
            ids = tok(prompt).input_ids
            assert ids[0] == tok.bos_token_id and unk not in ids, prompt
            assert len(ids) == 1 + len(prompt.split()), (prompt, tok.convert_ids_to_tokens(ids))


def test_tokenizer_gives_one_token_per_word(tmp_path):
    tok = build_tokenizer()
    _check_word_tokens(tok)
    tok.save_pretrained(tmp_path)
    _check_word_tokens(type(tok).from_pretrained(tmp_path))
    assert tok("a red circle", padding="max_length", max_length=8).input_ids[-1] == tok.pad_token_id  # right pad


def test_shipped_weights_load_and_are_small(policy):
    assert (EMBEDDED_DIR / "model_index.json").is_file()
    index = json.loads((EMBEDDED_DIR / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["transformer"][1] == "SanaTransformer2DModel"
    assert weights_size_bytes(EMBEDDED_DIR) <= MAX_WEIGHT_BYTES
    assert policy.family == "sana" and policy.vae is None
    assert policy.latent_shape() == (3, 32, 32) and policy.complex_human_instruction == ()
    _check_word_tokens(policy.tokenizer)


def test_sampling_is_deterministic_per_seed(policy):
    cond = policy.encode(["a red circle", "two blue squares", "a green triangle above a yellow circle"])
    with torch.no_grad():
        a = sample(policy, policy.transformer, cond, [0, 1, 2], 6)
        b = sample(policy, policy.transformer, cond, [0, 1, 2], 6)
        alone = sample(policy, policy.transformer, cond.index([1]), [1], 6)
        other = sample(policy, policy.transformer, cond, [3, 4, 5], 6)
    assert torch.equal(a, b)
    assert (alone[0] - a[1]).abs().max().item() < 1e-4  # an image depends on its seed, not its batch
    assert (other - a).abs().mean().item() > 0.05  # and different seeds give different images


def test_reference_sampler_matches_in_range(policy):
    model = TinyModel.from_pretrained(EMBEDDED_DIR)
    from solrl_core.models.tiny import sample as tiny_sample

    x = tiny_sample(model, ["a yellow square"] * 4, [0, 1, 2, 3], steps=10)
    assert x.shape == (4, 3, 32, 32)
    assert (x.abs() < 1.2).float().mean().item() > 0.99  # lands on images in [-1, 1]
    background = 20 / 127.5 - 1  # scenes.BACKGROUND is (20, 20, 20)
    assert (x - background).abs().median().item() < 0.15  # mostly dark background, as drawn


def test_acceptance_single_objects_followed_compositions_leave_room():
    results, _ = evaluate(EMBEDDED_DIR, n=64, steps=10)
    single = results["single"].pass_rate
    assert single >= 0.6
    for kind in ("count", "relation"):
        assert results[kind].pass_rate <= single - 0.15, (kind, results[kind].pass_rate, single)


def test_training_reduces_the_loss_and_exports_a_loadable_folder(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "w"), preset="test", steps=60, batch_size=16, threads=1,
                      save_every=0, log_every=1000, warmup_steps=10, lr=2e-3)
    res = train(cfg)
    start, end = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    assert res.steps_done == 60 and end < 0.7 * start, (start, end)
    exported = load_policy(str(tmp_path / "w"))
    assert exported.latent_shape() == (3, 32, 32)
    assert json.loads((tmp_path / "w" / "training.json").read_text())["steps"] == 60


def test_training_is_reproducible(tmp_path):
    runs = [train(TrainConfig(out=str(tmp_path / f"r{i}"), preset="test", steps=4, batch_size=8, threads=1,
                              save_every=0, log_every=1000)).losses for i in range(2)]
    assert runs[0] == runs[1]
