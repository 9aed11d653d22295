"""The switches that trade time for memory leave what a run computes as it was (or within a stated
tolerance): gradient checkpointing, regenerating through the sampling adapter, offloading frozen parts,
8-bit AdamW. How much memory each saves is measured in benchmarks/memory.py and counted by the plan."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from solrl_core.models import adapter_state, load_adapter_state, load_policy
from solrl_core.models.lora import SAMPLING, TRAINED, trainable_parameters
from solrl_core.plan.trace import trace_peak
from solrl_core.rewards import WeightedReward, load_reward
from solrl_core.train import settings as st
from solrl_core.train.offload import Offloader
from solrl_core.train.samples import SampleBatch
from solrl_core.train.session import TrainingSession
from solrl_core.train.stages import explore, regenerate, select, update

PROMPTS = ["a red circle", "a blue square"]


def _session(tmp_path, name="run", dtype=torch.float32, **config) -> TrainingSession:
    """The embedded model with trained and sampling weights different from each other and the base."""
    config = {"lora_rank": 8, "lora_alpha": 8.0, **config}
    session = TrainingSession(tmp_path / name, load_policy("embedded", dtype=dtype), PROMPTS, st.SessionConfig(**config))
    model = session.policy.transformer
    g = torch.Generator().manual_seed(1)
    scale = 0.02 if session.config.full_finetune else 0.3
    for adapter in (TRAINED, SAMPLING):
        load_adapter_state(model, adapter, {k: v + scale * torch.randn(v.shape, generator=g)
                                            for k, v in adapter_state(model, adapter).items()})
    return session


def _kept(session, steps=8) -> SampleBatch:
    return SampleBatch(session, list(PROMPTS), torch.tensor([[11, 12], [13, 14]]), torch.zeros(2, 2, 3, 32, 32),
                       torch.zeros(2, 2), steps=steps, prompt_ids=[0, 1])


def _training_batch(session) -> SampleBatch:
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 2, 3, 32, 32, generator=g).clamp(-1, 1)
    return SampleBatch(session, list(PROMPTS), torch.tensor([[1, 2], [3, 4]]), latents,
                       torch.tensor([[0.0, 1.0], [0.2, 0.6]]), steps=3, prompt_ids=[0, 1])


class MeanBrightness:
    """A reward without weights: the mean pixel value."""

    device = torch.device("cpu")

    def to(self, device):
        return self

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)), {}


# --- gradient checkpointing -------------------------------------------------------------------
def _update(session, **settings):
    """One update: (stats, gradients at the step, trained weights after, bytes of live tensors it
    allocated: peak and still held after)."""
    params = trainable_parameters(session.policy.transformer)
    grads: list[torch.Tensor] = []
    s = st.UpdateSettings(lr=1e-3, micro_batch=4, **settings)
    session.get_optimizer(s.optimizer_settings()).register_step_pre_hook(
        lambda *a: grads.extend(p.grad.clone() for p in params))
    batch = _training_batch(session)
    out = {}
    memory = trace_peak(lambda: out.update(update(batch, s)), fused=False)
    return out, grads, adapter_state(session.policy.transformer, TRAINED), memory


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_step(tmp_path):
    """Recomputing the blocks in backward runs the same ops on the same inputs: bit-identical on CPU. The
    first block runs once more per (micro-batch, timestep) pair, in backward: checkpointing was on."""
    calls = {}

    def counted(session, name):
        block = session.policy.transformer.transformer_blocks[0]
        calls[name] = 0
        block.register_forward_pre_hook(lambda *a: calls.__setitem__(name, calls[name] + 1))
        return session

    plain = _update(counted(_session(tmp_path, "plain"), "plain"))
    session = counted(_session(tmp_path, "checkpointed"), "checkpointed")
    checkpointed = _update(session, gradient_checkpointing=True)
    assert plain[0]["loss"] == checkpointed[0]["loss"] and checkpointed[0]["gradient_checkpointing"] is True
    assert len(plain[1]) == len(checkpointed[1]) and all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1]))
    assert all(torch.equal(plain[2][k], checkpointed[2][k]) for k in plain[2])
    # One pair (4 samples, micro-batch 4, int(0.6 * 3) = 1 timestep): v_old, v_ref, v, and the recompute.
    assert (calls["plain"], calls["checkpointed"]) == (3, 4)
    assert session.policy.transformer.gradient_checkpointing is False  # off again for sampling
    # Peak bytes of live tensors the update allocates (counted op by op, deterministic): the blocks'
    # activations are no longer kept for backward (measured 18.8 -> 6.0 MiB on the embedded model).
    assert checkpointed[3].peak < 0.5 * plain[3].peak, (checkpointed[3].peak, plain[3].peak)


# --- regenerating through the sampling adapter --------------------------------------------------
def _regenerated(session, mode: str) -> torch.Tensor:
    session.refresh_copies(st.RequantizeSettings(backend="none", regenerator=mode))
    return regenerate(_kept(session), MeanBrightness(), st.RegenerateSettings(steps=8)).latents


def _bytes(*modules) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]}
    return sum(storages.values())


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_adapter_regenerator_samples_as_the_merged_copy_without_the_copy(tmp_path, full_finetune):
    """fp32: merged (W + s B A) x and unmerged W x + s B (A x) round differently, by a few fp32 ulps per
    layer: over 8 Euler steps at most 1e-4 (measured 2.7e-5) on latents in [-1, 1]. Full fine-tuning
    swaps the same weights in: bit-identical."""
    merged_session = _session(tmp_path, "merged", full_finetune=full_finetune)
    merged = _regenerated(merged_session, "merged_copy")
    session = _session(tmp_path, "adapter", full_finetune=full_finetune)
    through_adapter = _regenerated(session, "adapter")
    if full_finetune:
        assert torch.equal(through_adapter, merged)
    else:
        assert (through_adapter - merged).abs().max() <= 1e-4
    assert session.copies.regenerator is None and session.pending["regenerator"] == "adapter"
    # One full transformer copy less: the merged copy holds every base weight (merged) and buffer again.
    model = session.policy.transformer
    base_bytes = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                     if ".lora_" not in n)
    assert _bytes(merged_session.copies.regenerator) == base_bytes > 0


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_adapter_regenerator_in_bf16_is_as_close_to_full_precision_as_the_merged_copy(tmp_path, full_finetune):
    """bf16: the merged copy rounds W + dW to bf16 while the adapter path adds an fp32 LoRA output (or
    computes norms in fp32 under autocast), so the two differ by bf16 rounding, amplified over 8 steps
    (max 0.15 here). Neither is the reference: the fp32 samples are. Tolerance: the adapter path's RMS
    distance to them is at most 1.25x the merged copy's (measured 1.02x LoRA, 0.72x full)."""
    reference = _regenerated(_session(tmp_path, "fp32", full_finetune=full_finetune), "merged_copy")
    rms = {mode: (_regenerated(_session(tmp_path, mode, torch.bfloat16, full_finetune=full_finetune), mode)
                  - reference).pow(2).mean().sqrt().item() for mode in ("merged_copy", "adapter")}
    assert rms["adapter"] <= 1.25 * rms["merged_copy"], rms


def test_regenerator_setting_may_change_between_presses(tmp_path):
    session = _session(tmp_path)
    merged = _regenerated(session, "merged_copy")
    assert session.copies.regenerator is not None
    session.iteration += 1  # a later press, regenerating through the adapter: the copy is dropped
    through_adapter = _regenerated(session, "adapter")
    assert session.copies.regenerator is None and (through_adapter - merged).abs().max() <= 1e-4
    session.iteration += 1
    assert torch.equal(_regenerated(session, "merged_copy"), merged) and session.copies.regenerator is not None


# --- offloading frozen parts --------------------------------------------------------------------
class Placement:
    """A stand-in device mover: records where each part is ('device' or 'cpu') without moving it, so
    a CPU-only test sees the moves an accelerator run makes. Parts are parked on the 'meta' label."""

    def __init__(self):
        self.where: dict[int, str] = {}
        self.moves: list[tuple[str, str]] = []
        self.names: dict[int, str] = {}

    def __call__(self, part, device) -> None:
        place = "cpu" if torch.device(device).type == "meta" else "device"
        self.where[id(part)] = place
        self.moves.append((self.names.get(id(part), type(part).__name__), place))

    def at(self, part) -> str:
        return self.where.get(id(part), "device")


def _iteration(session, reward, uses: list) -> dict:
    session.refresh_copies(st.RequantizeSettings(backend="emulated", min_dim=0))
    uses.append("requantize")
    drafts = explore(session, reward, st.ExploreSettings(prompts_per_iteration=2, candidates=4, steps=2, batch_size=8))
    kept = regenerate(select(drafts, st.SelectSettings(keep=2)), reward, st.RegenerateSettings(steps=3))
    stats = update(kept, st.UpdateSettings(lr=1e-3, micro_batch=4))
    session.commit(stats)
    return {k: v for k, v in session.metrics[-1].items() if not k.startswith("time_")}


def test_offloading_keeps_each_frozen_part_on_the_device_only_while_it_is_used(tmp_path):
    reward = WeightedReward([(load_reward("shapes"), 1.0)])
    plain_session = _session(tmp_path, "plain")
    plain = [_iteration(plain_session, reward, []) for _ in range(2)]

    session = _session(tmp_path, "offload", offload_frozen=True)
    placement = Placement()
    session.offload = Offloader(True, move=placement, storage="meta")
    encoder = session.policy.text_encoder
    explorer = session.refresh_copies(st.RequantizeSettings(backend="emulated", min_dim=0)).explorer
    placement.names.update({id(encoder): "text_encoder", id(reward): "reward", id(explorer): "explorer"})
    session.set_offload(True)  # Training Run's offload_frozen: the text encoder waits on the CPU
    assert placement.at(encoder) == "cpu" and placement.at(explorer) == "device"
    explorer_calls: list = []
    explorer.register_forward_pre_hook(lambda m, a: explorer_calls.append(placement.at(m)))
    uses: list = []
    encoder.register_forward_pre_hook(lambda m, a: uses.append(("encode", placement.at(m))))
    original_score = reward.score

    def score(images, prompts):
        uses.append(("score", placement.at(reward), placement.at(session.copies.explorer)))
        return original_score(images, prompts)

    reward.score = score
    trained = session.policy.transformer

    def on_trained_forward(module, args):  # the update (the merged copy regenerates)
        uses.append(("train", placement.at(encoder), placement.at(reward), placement.at(explorer)))

    trained.register_forward_pre_hook(on_trained_forward)
    results = [_iteration(session, reward, uses) for _ in range(2)]
    assert [r.pop("offload_frozen") for r in results] == [True, True]  # recorded with each iteration
    assert results == [{k: v for k, v in r.items() if k != "offload_frozen"} for r in plain]  # same numbers
    weights = {k: v for k, v in adapter_state(trained, TRAINED).items()}
    assert all(torch.equal(weights[k], adapter_state(plain_session.policy.transformer, TRAINED)[k]) for k in weights)
    assert explorer_calls and set(explorer_calls) == {"device"}  # explores only on the device
    encodes = [u for u in uses if u[0] == "encode"]
    assert encodes and set(encodes) == {("encode", "device")}  # encodes only on the device ...
    assert uses.index("requantize", 1) > max(i for i, u in enumerate(uses) if u[0] == "encode")  # ... once
    assert {u for u in uses if u[0] == "score"} == {("score", "device", "cpu")}  # explorer parked after exploring
    assert {u for u in uses if u[0] == "train"} == {("train", "cpu", "cpu", "cpu")}  # the update has the device
    # The explorer comes back for the second requantize and leaves after each exploration; the reward
    # leaves after each of the 4 scorings and comes back for the 3 after the first; the text encoder
    # came once (cold prompt cache) and left again.
    count = placement.moves.count
    assert (count(("explorer", "device")), count(("explorer", "cpu"))) == (1, 2)
    assert (count(("reward", "device")), count(("reward", "cpu"))) == (3, 4)
    assert (count(("text_encoder", "device")), count(("text_encoder", "cpu"))) == (1, 2)
    session.set_offload(False)  # switched off between presses: everything comes back
    assert placement.at(encoder) == placement.at(explorer) == placement.at(reward) == "device"


def test_offloading_may_change_between_presses(tmp_path):
    from solrl_core.train.session import open_session

    policy = load_policy("embedded")
    first = open_session(tmp_path / "run", policy, PROMPTS, st.SessionConfig(lora_rank=4))
    again = open_session(tmp_path / "run", policy, PROMPTS, st.SessionConfig(lora_rank=4, offload_frozen=True))
    assert again is first and first.offload.enabled
    first.commit({})
    resumed = TrainingSession(tmp_path / "run", load_policy("embedded"), PROMPTS, st.SessionConfig(lora_rank=4))
    assert resumed.iteration == 1 and not resumed.offload.enabled  # saved with offloading on, resumed off
    with pytest.raises(ValueError, match="other settings"):  # a run-defining setting still may not change
        TrainingSession(tmp_path / "run", load_policy("embedded"), PROMPTS, st.SessionConfig(lora_rank=8))


# --- 8-bit AdamW --------------------------------------------------------------------------------
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")


@pytest.fixture
def eager_torchao():
    """torchao compiles its step with torch.compile (tens of seconds per shape on CPU); the default suite
    runs the same ops eagerly, the slow test compiled."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _two_updates(session, optimizer: str) -> dict[str, torch.Tensor]:
    """Two committed iterations on the same batch; the trained weights after them."""
    for _ in range(2):
        session.commit(update(_training_batch(session), st.UpdateSettings(lr=1e-3, micro_batch=4, optimizer=optimizer)))
    return adapter_state(session.policy.transformer, TRAINED)


@needs_torchao
def test_adamw8bit_steps_as_adamw_within_its_quantization(tmp_path, eager_torchao):
    """Step 1 updates from the fp32 moments before quantizing them: as AdamW to fp32 rounding. Step 2
    starts from 8-bit moments (dynamic code book, one scale per 256 values: relative error up to a few
    % for values far below their block's maximum), so the total change of the weights may differ by
    at most 5% in norm (measured: 1.7%)."""
    start = adapter_state(_session(tmp_path, "start", lora_rank=32).policy.transformer, TRAINED)
    fp32 = _two_updates(_session(tmp_path, "fp32", lora_rank=32), "adamw")
    session = _session(tmp_path, "8bit", lora_rank=32)
    eight = _two_updates(session, "adamw8bit")
    delta32 = torch.cat([(fp32[k] - start[k]).flatten() for k in start])
    delta8 = torch.cat([(eight[k] - start[k]).flatten() for k in start])
    assert (delta8 - delta32).norm() <= 0.05 * delta32.norm(), ((delta8 - delta32).norm(), delta32.norm())
    assert session.metrics[-1]["optimizer"] == "adamw8bit"
    from solrl_core.train.optimizers import state_bytes

    fp32_session = _session(tmp_path, "bytes", lora_rank=32)
    _two_updates(fp32_session, "adamw")
    # Two moments per weight: fp32 (8 bytes) or, for tensors of >= 4096 values in blocks of 256, a uint8
    # code each, an fp32 scale per block and a 256-entry fp32 code book per moment; a 4-byte step counter.
    sizes = [p.numel() for p in trainable_parameters(session.policy.transformer)]
    quantized = [n for n in sizes if n >= 4096 and n % 256 == 0]
    assert len(quantized) > len(sizes) // 2  # rank 32 x width 128: the self-attention LoRA matrices
    expected8 = sum(4 + (2 * (n + 4 * (n // 256) + 4 * 256) if n in quantized else 8 * n) for n in sizes)
    assert state_bytes(fp32_session.optimizer) == sum(4 + 8 * n for n in sizes)
    assert state_bytes(session.optimizer) == expected8
    # Measured: bytes of live tensors a first update leaves allocated (the moments, made at the step).
    held = {}
    for kind in ("adamw", "adamw8bit"):
        fresh = _session(tmp_path, f"held-{kind}", lora_rank=32)
        batch = _training_batch(fresh)
        held[kind] = trace_peak(lambda b=batch, k=kind: update(b, st.UpdateSettings(lr=1e-3, micro_batch=4, optimizer=k)),
                                fused=False).held
    assert held["adamw8bit"] < held["adamw"] / 3, held  # measured 0.26


@needs_torchao
def test_adamw8bit_resumes_exactly(tmp_path, eager_torchao):
    uninterrupted = _two_updates(_session(tmp_path, "once", lora_rank=32), "adamw8bit")
    first = _session(tmp_path, "resumed", lora_rank=32)
    first.commit(update(_training_batch(first), st.UpdateSettings(lr=1e-3, micro_batch=4, optimizer="adamw8bit")))
    resumed = TrainingSession(tmp_path / "resumed", load_policy("embedded"), PROMPTS, first.config)
    assert type(next(iter(resumed.optimizer.state.values()))["exp_avg"]).__name__ == "OptimState8bit"
    resumed.commit(update(_training_batch(resumed), st.UpdateSettings(lr=1e-3, micro_batch=4, optimizer="adamw8bit")))
    after = adapter_state(resumed.policy.transformer, TRAINED)
    assert all(torch.equal(after[k], uninterrupted[k]) for k in after)
    with pytest.raises(ValueError, match="UpdateSettings.optimizer: this run's optimizer state is 'adamw8bit'"):
        update(_training_batch(resumed), st.UpdateSettings(optimizer="adamw"))


@needs_torchao
@pytest.mark.slow
def test_adamw8bit_compiled_as_torchao_runs_it(tmp_path):
    """torchao's compiled step (inductor on CPU, tens of seconds per tensor shape). Fused arithmetic can
    round a moment to the neighbouring 8-bit code, which moves that weight at step 2 by up to ~lr / 10
    (measured 1e-4 at lr 1e-3): the total change stays within 1% in norm of the eager one."""
    start = adapter_state(_session(tmp_path, "start", lora_rank=32).policy.transformer, TRAINED)
    compiled = _two_updates(_session(tmp_path, "compiled", lora_rank=32), "adamw8bit")
    with torch.compiler.set_stance("force_eager"):
        eager = _two_updates(_session(tmp_path, "eager", lora_rank=32), "adamw8bit")
    d_compiled = torch.cat([(compiled[k] - start[k]).flatten() for k in start])
    d_eager = torch.cat([(eager[k] - start[k]).flatten() for k in start])
    assert (d_compiled - d_eager).norm() <= 0.01 * d_eager.norm(), ((d_compiled - d_eager).norm(), d_eager.norm())


def test_adamw8bit_without_torchao_is_a_one_line_error_before_compute(tmp_path, capsys, monkeypatch):
    from solrl_core.bundled import QUICKSTART, training_graph
    from solrl_core.run import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    from dataclasses import replace

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(training_graph(replace(QUICKSTART, optimizer="adamw8bit"))))
    assert main([str(wf), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer" in err and "torchao" in err and '".[adamw8bit]"' in err, err
    assert not (tmp_path / "run").exists()
    from solrl_core.train.optimizers import OptimizerUnavailableError, build_optimizer

    with pytest.raises(OptimizerUnavailableError, match="pip install"):  # the Python API says the same
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**st.UpdateSettings().optimizer_settings(),
                                                                "kind": "adamw8bit"})
