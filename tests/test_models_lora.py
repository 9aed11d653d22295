"""LoRA adapters ("default" trained, "old" sampling, base = reference) and full fine-tuning."""
from __future__ import annotations

import pytest
import torch
from model_factories import build_sana, save_pipeline

from solrl_core.models import (
    Conditioning,
    adapter_state,
    adapters_disabled,
    add_lora,
    load_adapter_state,
    load_policy,
    make_inference_copy,
    refresh_inference_copy,
    trainable_parameters,
    use_adapter,
)

SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(build_sana(seed=4, with_vae=False, sample_size=SIZE), tmp_path_factory.mktemp("lora") / "sana")


@pytest.fixture
def policy(folder):
    return load_policy(str(folder), max_sequence_length=8)


@pytest.fixture
def batch(policy):
    cond = policy.encode(["a red circle", "two blue squares"])
    return policy.initial_noise([1, 2]), torch.tensor([0.8, 0.3]), cond


def _perturb(model, name: str, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in adapter_state(model, name).items()}
    load_adapter_state(model, name, state)


def test_two_adapters_start_equal_and_as_the_base(policy, batch):
    x, sigma, cond = batch
    with torch.no_grad():
        v_base = policy.velocity(policy.transformer, x, sigma, cond)
    model = add_lora(policy, lora_rank=4, lora_alpha=8)
    n_layers = len(policy.transformer.transformer_blocks)
    params = trainable_parameters(model, "default")
    assert len(params) == n_layers * 2 * 4 * 2  # attn1 + attn2, to_q/k/v/out.0, lora_A + lora_B
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    old, default = adapter_state(model, "old"), adapter_state(model, "default")
    assert old.keys() == default.keys() and all(torch.equal(old[k], default[k]) for k in old)
    assert any(v.abs().sum() > 0 for k, v in default.items() if "lora_A" in k)  # gaussian A, zero B
    with torch.no_grad():
        v_default = policy.velocity(model, x, sigma, cond)
        with use_adapter(model, "old"):
            v_old = policy.velocity(model, x, sigma, cond)
    assert torch.equal(v_default, v_base) and torch.equal(v_old, v_base)


def test_switching_restores_adapter_and_requires_grad(policy, batch):
    x, sigma, cond = batch
    model = add_lora(policy, lora_rank=4, lora_alpha=8)
    _perturb(model, "default", seed=1)
    _perturb(model, "old", seed=2)
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        v_default = policy.velocity(model, x, sigma, cond)
        with use_adapter(model, "old"):
            v_old = policy.velocity(model, x, sigma, cond)
            with adapters_disabled(model):
                v_ref = policy.velocity(model, x, sigma, cond)
            assert torch.equal(policy.velocity(model, x, sigma, cond), v_old)
        assert torch.equal(policy.velocity(model, x, sigma, cond), v_default)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert (v_default - v_old).abs().max() > 1e-3 and (v_old - v_ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="adapter 'ema' is not on this model"):
        with use_adapter(model, "ema"):
            pass


def test_gradients_reach_only_the_trained_adapter(policy, batch):
    x, sigma, cond = batch
    model = add_lora(policy, lora_rank=4, lora_alpha=8)
    _perturb(model, "old", seed=3)
    with torch.no_grad(), use_adapter(model, "old"):
        v_old = policy.velocity(model, x, sigma, cond)
    with torch.no_grad(), adapters_disabled(model):
        v_ref = policy.velocity(model, x, sigma, cond)
    v = policy.velocity(model, x, sigma, cond)
    ((v - v_old) ** 2).mean().add(((v - v_ref) ** 2).mean()).backward()
    trained = {id(p) for p in trainable_parameters(model, "default")}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert sum(p.grad.abs().sum() for p in trainable_parameters(model, "default")) > 0


def test_adapter_state_round_trip_and_errors(policy):
    model = add_lora(policy, lora_rank=4, lora_alpha=8)
    _perturb(model, "default", seed=5)
    state = adapter_state(model, "default")
    assert all(".default." not in k and ".old." not in k for k in state)
    load_adapter_state(model, "old", state)
    assert all(torch.equal(state[k], v) for k, v in adapter_state(model, "old").items())
    params_before = [id(p) for p in trainable_parameters(model, "old")]
    load_adapter_state(model, "old", {k: v * 2 for k, v in state.items()})
    assert [id(p) for p in trainable_parameters(model, "old")] == params_before  # in place
    with pytest.raises(KeyError, match="lacks"):
        load_adapter_state(model, "old", dict(list(state.items())[1:]))


def test_inference_copy_is_separate_and_refresh_is_in_place(policy, batch):
    x, sigma, cond = batch
    model = add_lora(policy, lora_rank=4, lora_alpha=8)
    _perturb(model, "old", seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = make_inference_copy(policy, "old")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trained model untouched
    assert not any(p.requires_grad for p in copy.parameters())
    layer = copy.get_submodule("transformer_blocks.0.attn1.to_q")
    weight = layer.weight
    _perturb(model, "old", seed=7, scale=0.2)  # an "old" update after the training step
    refresh_inference_copy(copy, policy, "old")
    with torch.no_grad(), use_adapter(model, "old"):
        v_old = policy.velocity(model, x, sigma, cond)
    v_copy = policy.velocity(copy, x, sigma, cond)
    assert (v_copy - v_old).abs().max().item() < 1e-5
    assert copy.get_submodule("transformer_blocks.0.attn1.to_q").weight is weight  # refreshed in place


def test_full_finetune_keeps_old_and_base_as_parameter_copies(policy, batch):
    x, sigma, cond = batch
    model = add_lora(policy, full_finetune=True)
    params = trainable_parameters(model)
    assert len(params) == len(list(model.parameters())) and all(p.requires_grad for p in params)
    with torch.no_grad():
        v_start = policy.velocity(model, x, sigma, cond)
    # one optimizer step on "default"
    optimizer = torch.optim.SGD(params, lr=0.5)
    policy.velocity(model, x, sigma, cond).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        v_trained = policy.velocity(model, x, sigma, cond)
        with use_adapter(model, "old"):
            v_old = policy.velocity(model, x, sigma, cond)
        with adapters_disabled(model):
            v_ref = policy.velocity(model, x, sigma, cond)
        assert torch.equal(policy.velocity(model, x, sigma, cond), v_trained)  # swapped back
    assert torch.equal(v_old, v_start) and torch.equal(v_ref, v_start)
    assert (v_trained - v_start).abs().max() > 1e-3
    # v_old evaluated inside the context between forward and backward leaves the gradients right
    loss = policy.velocity(model, x, sigma, cond).pow(2).mean()
    with torch.no_grad(), use_adapter(model, "old"):
        policy.velocity(model, x, sigma, cond)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    optimizer.zero_grad()
    policy.velocity(model, x, sigma, cond).pow(2).mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads, (p.grad for p in params)))
    # old <- current (the EMA-style update), then the inference copy follows
    copy = make_inference_copy(policy, "old")
    assert torch.equal(policy.velocity(copy, x, sigma, cond), v_start)
    load_adapter_state(model, "old", adapter_state(model, "default"))
    refresh_inference_copy(copy, policy, "old")
    assert torch.equal(policy.velocity(copy, x, sigma, cond), v_trained)


def test_conditioning_index_cat_and_to():
    cond = Conditioning(embeds=torch.arange(6.0).reshape(3, 2, 1), mask=torch.ones(3, 2, dtype=torch.long))
    picked = cond.index([2, 2, 0])
    assert picked.embeds[:, 0, 0].tolist() == [4.0, 4.0, 0.0] and picked.pooled is None
    joined = Conditioning.cat([cond, picked])
    assert len(joined) == 6 and joined.mask.shape == (6, 2)
    half = cond.to(dtype=torch.float16)
    assert half.embeds.dtype == torch.float16 and half.mask.dtype == torch.long


def test_encode_is_cached_per_prompt(policy):
    first = policy.encode(["a red circle", "a blue square", "a red circle"])
    assert len(policy._prompt_cache) == 2
    assert torch.equal(first.embeds[0], first.embeds[2])
    alone = policy.encode(["a blue square"])
    assert torch.equal(alone.embeds[0], first.embeds[1])
