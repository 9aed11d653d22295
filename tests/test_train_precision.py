"""Trained weights and optimizer state in fp32 whatever the model's dtype; forward in the model's dtype.

The embedded model is loaded in bf16 (as on a GPU) and trained through the product's own update.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from solrl_core.models import adapter_state, load_adapter_state, load_policy
from solrl_core.models.lora import SAMPLING, TRAINED, trainable_parameters, trained_forward
from solrl_core.train.samples import SampleBatch
from solrl_core.train.session import EMA, TrainingSession
from solrl_core.train.settings import SessionConfig, UpdateSettings
from solrl_core.train.stages import update

PROMPTS = ["a red circle", "a blue square"]
BF16_HALF_ULP = 2.0**-9  # bf16 keeps 8 significant bits: a change below 2^-9 |w| rounds away


def _session(tmp_path, dtype, full_finetune=False, name="run") -> TrainingSession:
    policy = load_policy("embedded", dtype=dtype)
    config = SessionConfig(lora_rank=4, lora_alpha=8.0, full_finetune=full_finetune)
    return TrainingSession(tmp_path / name, policy, PROMPTS, config)


def _batch(session) -> SampleBatch:
    """Two prompts x two samples of the embedded model's pixel space, distinct rewards."""
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 2, 3, 32, 32, generator=g).clamp(-1, 1)
    return SampleBatch(session, list(PROMPTS), torch.tensor([[1, 2], [3, 4]]), latents,
                       torch.tensor([[0.0, 1.0], [0.2, 0.6]]), steps=3, prompt_ids=[0, 1])


def _give_weights_of_magnitude_one(session) -> None:
    """Trained and sampling weights ~N(0, 1) (LoRA B too, so every weight gets a gradient)."""
    model = session.policy.transformer
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g) for k, v in adapter_state(model, TRAINED).items()}
    if session.config.full_finetune:  # keep the network sane: perturb the trained weights only slightly
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model, TRAINED).items()}
    load_adapter_state(model, TRAINED, state)
    load_adapter_state(model, SAMPLING, state)


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_checkpoint_holds_fp32_weights_and_optimizer_state_under_a_bf16_model(tmp_path, full_finetune):
    session = _session(tmp_path, torch.bfloat16, full_finetune)
    model = session.policy.transformer
    if full_finetune:  # fp32 master weights; the frozen reference copy keeps the model's dtype
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {t.dtype for t in model._solrl_full_copies["base"].values()} == {torch.bfloat16}
    else:  # the frozen base stays bf16
        assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    session.commit(update(_batch(session), UpdateSettings(lr=1e-4, kl_coef=1e-4, micro_batch=4)))
    ckpt = tmp_path / "run" / "checkpoints" / "iter-000001"
    weights, moments = load_file(ckpt / "weights.safetensors"), load_file(ckpt / "optimizer.safetensors")
    for prefix in (TRAINED, SAMPLING, EMA):
        tensors = [v for k, v in weights.items() if k.startswith(prefix + ".")]
        assert tensors and {t.dtype for t in tensors} == {torch.float32}, prefix
    assert {v.dtype for k, v in moments.items() if "exp_avg" in k} == {torch.float32}
    assert len([k for k in moments if k.endswith("exp_avg_sq")]) == len(trainable_parameters(model))
    # The forward runs in the model's dtype: the transformer's output is bf16.
    policy = session.policy
    out = []
    handle = model.register_forward_hook(lambda m, i, o: out.append(o[0] if isinstance(o, tuple) else o.sample))
    x = policy.initial_noise([7])
    with torch.no_grad(), trained_forward(policy):
        policy.velocity(model, x, torch.tensor([0.5]), policy.encode(PROMPTS[:1]))
    handle.remove()
    assert out[0].dtype == torch.bfloat16


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_a_step_below_bf16_resolution_survives(tmp_path, full_finetune):
    """AdamW's first step moves each weight by lr * (wd * w + g / (|g| + eps)) (bias corrections cancel at
    step 1): 1e-5 on weights of magnitude ~1, far below bf16's half-ulp there (2^-9 |w| ~ 2e-3), which a
    bf16 weight would round away. In fp32 it lands to within one fp32 ulp."""
    session = _session(tmp_path, torch.bfloat16, full_finetune)
    _give_weights_of_magnitude_one(session)
    model = session.policy.transformer
    params = trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    grads: list[torch.Tensor] = []
    s = UpdateSettings(lr=1e-5, kl_coef=1e-4, micro_batch=4, grad_clip=1e6, weight_decay=1e-4)
    optimizer = session.get_optimizer(s.optimizer_settings())
    optimizer.register_step_pre_hook(lambda *a: grads.extend(
        p.grad.detach().clone() if p.grad is not None else None for p in params))
    stats = update(_batch(session), s)
    assert stats["stepped"] == 1 and len(grads) == len(params)
    moved = checked = 0
    for p, w, g in zip(params, before, grads):
        if g is None:
            continue
        w64, g64 = w.double(), g.double()
        expected = w64 - s.lr * s.weight_decay * w64 - s.lr * g64 / (g64.abs() + s.adam_eps)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=2.0**-23 * (w64.abs().max() + 1))
        big = (g64.abs() > 1e-3) & (w64.abs() > 0.25)
        assert ((expected - w64).abs()[big] < BF16_HALF_ULP * w64.abs()[big]).all()  # bf16 would drop it
        moved += int((p.detach() != w)[big].sum())
        checked += int(big.sum())
    assert checked > 100 and moved == checked


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_bf16_and_fp32_first_update_losses_agree(tmp_path, full_finetune):
    """The same first update (same samples, rewards, timesteps and noise) with the model in bf16 and in
    fp32. Tolerance: one bf16 unit roundoff, u = 2^-9 ~ 0.2%, relative. bf16 rounds every matmul input to
    8 significant bits, so each velocity element is off by a few u with signs that vary; the loss averages
    squared x0-prediction errors over 4 samples x 3072 values, which averages those errors down (measured:
    0.014% LoRA, 0.02% full fine-tuning), so one u leaves a 10x margin. The KL term is a mean squared
    difference of two velocities, so their rounding does not average out: 2% (measured 0.1-0.4%)."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        session = _session(tmp_path, dtype, full_finetune, name=str(dtype))
        _give_weights_of_magnitude_one(session)
        stats = update(_batch(session), UpdateSettings(lr=1e-4, micro_batch=4))
        losses[dtype] = (stats["loss"], stats["kl"])
    (l32, kl32), (l16, kl16) = losses[torch.float32], losses[torch.bfloat16]
    assert abs(l16 - l32) <= 2.0**-9 * abs(l32), (l16, l32)
    assert abs(kl16 - kl32) <= 0.02 * abs(kl32), (kl16, kl32)
