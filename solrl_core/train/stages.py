"""The four stages of a Sol-RL iteration, as plain functions the nodes call.

explore: N seeds per prompt through the low-precision explorer (D steps), scored (proxy reward).
select:  keep K per prompt by proxy reward.
regenerate: the same seeds through the full-precision copy (F steps), re-scored; optionally an
         audit of how well the proxy ranked the whole pool.
update:  DiffusionNFT on the kept samples: one optimizer step, then old / EMA updates.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import Tensor

from ..models import adapter_state, adapters_disabled, load_adapter_state, use_adapter
from ..models.lora import SAMPLING, TRAINED, trainable_parameters, trained_forward
from ..runtime import distributed as dp
from ..runtime.context import current_context
from ..sampling import sample
from .advantages import advantages
from .audit import ranking_agreement
from .nft import nft_loss, noised
from .samples import SampleBatch
from .schedules import blend_, ema_decay, old_decay
from .selection import kept_indices
from .session import TrainingSession
from .settings import EvaluateSettings, ExploreSettings, RegenerateSettings, SelectSettings, UpdateSettings


def _stats(prefix: str, values: Tensor) -> dict[str, float]:
    values = dp.gather_cat(values.flatten())  # statistics of the whole batch, over all processes
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return {f"{prefix}_mean": math.nan}
    return {f"{prefix}_mean": finite.mean().item(), f"{prefix}_max": finite.max().item(),
            f"{prefix}_min": finite.min().item()}


def _each_sample(prompts: list[str], per_prompt: int) -> list[str]:
    """The prompt of every sample of a [P, M] batch, row-major (as latents.flatten(0, 1))."""
    return [p for p in prompts for _ in range(per_prompt)]


def score(session: TrainingSession, reward, latents: Tensor, prompts: list[str],
          decode_batch: int | None = None) -> tuple[Tensor, dict, Tensor]:
    """Decode [B, ...] latents and score them: (total [B], components {name: [B]}, images).

    Decoded `decode_batch` latents at a time (default all): a full-resolution VAE decode holds about
    a gigabyte of activations per image, so a stage's whole pool would not fit on any GPU.
    """
    device = session.policy.device
    images = torch.cat([session.policy.decode(chunk.to(device)).float().cpu()
                        for chunk in latents.split(decode_batch or max(1, latents.shape[0]))])
    with session.offload.resident(reward):
        total, components = reward.score(images, prompts)
    return total.float(), {k: v.float() for k, v in components.items()}, images


def _generate(session: TrainingSession, precision: str, prompts: list[str], seeds: Tensor, steps: int,
              batch_size: int, desc: str) -> Tensor:
    """Sample seeds [P, M] for prompts [P] -> latents [P, M, ...], with progress and interruption."""
    ctx = current_context()
    p, m = seeds.shape
    flat_prompts = _each_sample(prompts, m)
    cond = session.encode(flat_prompts)
    bar = ctx.progress(steps, desc)

    def progress(done: int, total: int) -> None:
        ctx.check_interrupt()
        bar.update(done, total)

    try:
        with session.sampling_model(precision) as model:
            x0 = sample(session.policy, model, cond, seeds.flatten().tolist(), steps, batch_size=batch_size,
                        progress=progress)
    finally:
        bar.close()
    return x0.reshape(p, m, *x0.shape[1:])


def _scored_batch(session, reward, prompts, seeds, latents, precision, steps, prompt_ids,
                  decode_batch: int) -> SampleBatch:
    p, m = seeds.shape
    flat_prompts = _each_sample(prompts, m)
    total, comps, images = score(session, reward, latents.flatten(0, 1), flat_prompts, decode_batch)
    return SampleBatch(session, prompts, seeds, latents, total.reshape(p, m),
                       {k: v.reshape(p, m) for k, v in comps.items()}, precision, steps,
                       images=images.reshape(p, m, *images.shape[1:]), prompt_ids=list(prompt_ids))


def explore(session: TrainingSession, reward, s: ExploreSettings) -> SampleBatch:
    start = time.perf_counter()
    if session.done:  # a finished run queued again: nothing to sample, nothing to train
        empty = torch.zeros(0, s.candidates)
        return SampleBatch(session, [], empty.long(), empty, empty, precision=s.precision, steps=s.steps)
    if s.prompts_per_iteration < dp.world_size():
        raise ValueError(f"prompts_per_iteration={s.prompts_per_iteration} is below the number of processes "
                         f"({dp.world_size()}): every process needs at least one prompt")
    all_prompts = session.next_prompts(s.prompts_per_iteration)
    all_seeds = session.draw_seeds(len(all_prompts), s.candidates)
    rows = dp.local_rows(len(all_prompts))  # this process's prompts; seeds as one process would draw them
    prompts, seeds = [all_prompts[i] for i in rows], all_seeds[rows]
    latents = _generate(session, s.precision, prompts, seeds, s.steps, s.batch_size, f"explore ({s.precision})")
    if session.copies is not None:
        session.offload.park(session.copies.explorer)  # until the next Requantize
    batch = _scored_batch(session, reward, prompts, seeds, latents, s.precision, s.steps, rows, s.batch_size)
    session.pending.update(_stats("draft_reward", batch.rewards))
    session.pending["draft_dropped"] = int(dp.sum_((~torch.isfinite(batch.rewards)).sum()))
    session.pending["time_explore"] = time.perf_counter() - start
    return batch


def select(batch: SampleBatch, s: SelectSettings) -> SampleBatch:
    if not batch.prompts:
        return batch
    s.check(candidates=batch.shape[1])
    start = time.perf_counter()
    session: TrainingSession = batch.session
    idx = torch.cat([kept_indices(batch.rewards[i:i + 1], s.keep, s.mode,
                                  generator=session.generator(f"select/{pid}"))
                     for i, pid in enumerate(batch.prompt_ids)])
    kept = batch.subset(idx)
    session.pending.update(_stats("kept_proxy_reward", kept.rewards))
    session.pending["time_select"] = time.perf_counter() - start
    return kept


def regenerate(batch: SampleBatch, reward, s: RegenerateSettings) -> SampleBatch:
    if not batch.prompts:
        return batch
    session: TrainingSession = batch.session
    start = time.perf_counter()
    latents = _generate(session, "full", batch.prompts, batch.seeds, s.steps, s.batch_size, "regenerate")
    out = _scored_batch(session, reward, batch.prompts, batch.seeds, latents, "full", s.steps, batch.prompt_ids,
                        s.batch_size)
    out.proxy_rewards, out.pool_seeds, out.pool_rewards = batch.rewards, batch.pool_seeds, batch.pool_rewards
    session.pending.update(_stats("reward", out.rewards))
    for name, comp in out.components.items():
        if len(out.components) > 1:
            session.pending[f"reward_{name}_mean"] = comp[torch.isfinite(comp)].mean().item()
    session.pending["time_regenerate"] = time.perf_counter() - start
    if s.audit_every > 0 and session.iteration % s.audit_every == 0 and batch.pool_seeds is not None:
        session.pending.update(audit(session, batch, reward, s))
    return out


def audit(session: TrainingSession, batch: SampleBatch, reward, s: RegenerateSettings) -> dict[str, float]:
    """Regenerate a random subset of each prompt's draft pool at full precision; compare rankings."""
    start = time.perf_counter()
    pool_seeds, pool_rewards = batch.pool_seeds, batch.pool_rewards
    n = pool_seeds.shape[1]
    size = min(s.audit_size, n)
    idx = torch.stack([torch.sort(torch.randperm(n, generator=session.generator(f"audit/{pid}"))[:size]).values
                       for pid in batch.prompt_ids])
    seeds = torch.gather(pool_seeds, 1, idx)
    proxy = torch.gather(pool_rewards, 1, idx)
    latents = _generate(session, "full", batch.prompts, seeds, s.steps, s.batch_size, "audit")
    full = _scored_batch(session, reward, batch.prompts, seeds, latents, "full", s.steps, batch.prompt_ids,
                         s.batch_size).rewards
    stats = {f"audit_{k}": v for k, v in ranking_agreement(proxy, full, k=max(1, size // 4)).items()}
    stats["time_audit"] = time.perf_counter() - start
    return stats


def evaluate(batch: SampleBatch, reward, s: EvaluateSettings) -> SampleBatch:
    """Every `s.every` iterations, the held-out reward (held_out_reward) before this iteration's update."""
    session: TrainingSession = batch.session
    if not batch.prompts or s.every <= 0 or session.iteration % s.every:
        return batch
    session.pending.update(held_out_reward(session, reward, s))
    return batch


def held_out_reward(session: TrainingSession, reward, s: EvaluateSettings) -> dict[str, float]:
    """Reward of the run's held-out prompts (never trained on) at fixed seeds, through the
    full-precision sampling policy: a curve without the prompt-to-prompt noise of training batches
    that measures generalisation, not memorisation. `s.prompts`: how many of them (0: all)."""
    held_out = session.held_out_prompts
    if not held_out:
        raise ValueError("the run has no held-out prompts to score: set Training Run's held_out to the "
                         "number of prompts to keep out of training")
    if s.prompts > len(held_out):
        raise s.error("prompts", f"{s.prompts} is more than the run's {len(held_out)} held-out prompts (0: all)")
    start = time.perf_counter()
    chosen = held_out[:s.prompts or len(held_out)]
    rows = dp.local_rows(len(chosen))
    chosen = [chosen[i] for i in rows]
    seeds = torch.tensor([[10_000 + i * s.per_prompt + j for j in range(s.per_prompt)] for i in rows],
                         dtype=torch.long)
    latents = _generate(session, "full", chosen, seeds, s.steps, s.batch_size, "evaluate")
    scored = _scored_batch(session, reward, chosen, seeds, latents, "full", s.steps, rows, s.batch_size)
    return {**_stats("eval_reward", scored.rewards), "time_eval": time.perf_counter() - start}


@contextmanager
def _training_mode(model, gradient_checkpointing: bool):
    """Train mode for the update; with gradient checkpointing, diffusers' own (block inputs kept, the
    rest recomputed in backward), off again afterwards (sampling never records a graph)."""
    if gradient_checkpointing and not hasattr(model, "enable_gradient_checkpointing"):
        raise ValueError(f"UpdateSettings.gradient_checkpointing: {type(model).__name__} has no gradient "
                         "checkpointing (a diffusers model has)")
    model.train()
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if gradient_checkpointing:
            model.disable_gradient_checkpointing()
        model.eval()


def _sum_gradients(params) -> None:
    """Sum gradients over processes. A parameter that got no gradient on any process (full fine-tuning:
    a weight the forward never used) keeps none, so the optimizer leaves it alone (AdamW would decay it,
    and move it by its old moments); where only some processes have one, the others add zeros."""
    had = dp.sum_(torch.tensor([float(p.grad is not None) for p in params]))
    for p, any_grad in zip(params, had.tolist()):
        if not any_grad:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dp.sum_(p.grad)


def update(batch: SampleBatch, s: UpdateSettings) -> dict[str, float]:
    """DiffusionNFT on a batch: gradients of every (micro-batch, timestep) pair accumulate into
    exactly one optimizer step; then the sampling adapter and the EMA follow."""
    session: TrainingSession = batch.session
    policy, model = session.policy, session.policy.transformer
    start = time.perf_counter()
    ctx = current_context()
    # "reward" is always the reward of what is trained on (regenerated, or the kept drafts in baselines).
    for key, value in _stats("reward", batch.rewards).items():
        session.pending.setdefault(key, value)
    session.pending["train_precision"] = batch.precision
    _, r_opt = advantages(batch.rewards)
    p_local, m = batch.shape
    valid = torch.isfinite(r_opt).flatten()
    # A sample's global id fixes its timesteps and noise, whichever process trains it.
    ids = [batch.prompt_ids[i] * m + j for i in range(p_local) for j in range(m)]
    ids = [g for g, ok in zip(ids, valid.tolist()) if ok]
    flat_prompts = _each_sample(batch.prompts, m)
    prompts = [p for p, ok in zip(flat_prompts, valid.tolist()) if ok]
    x0_all = batch.latents.flatten(0, 1)[valid].to(policy.device, torch.float32)
    r_all = r_opt.flatten()[valid]
    n = x0_all.shape[0]
    stats = {"dropped": int(dp.sum_(torch.tensor((~valid).sum().item()))), "skipped_nonfinite": 0,
             "gradient_checkpointing": s.gradient_checkpointing, "optimizer": s.optimizer}
    optimizer = session.get_optimizer(s.optimizer_settings())
    optimizer.zero_grad(set_to_none=True)
    params = trainable_parameters(model, TRAINED)
    rollout_sigmas = policy.sigmas(batch.steps, *policy.image_size_of(batch.latents[0, :1]))[:-1].float()
    t_train = max(1, int(len(rollout_sigmas) * s.train_fraction))
    n_local_pairs = math.ceil(n / s.micro_batch) * t_train
    n_pairs = int(dp.sum_(torch.tensor(n_local_pairs)))  # the loss is a mean over all processes' pairs
    sums = torch.zeros(3, dtype=torch.float64)  # loss, kl, pairs done
    if n > 0:
        gens = {g: session.generator(f"train/{g}") for g in ids}
        choice = torch.stack([torch.randperm(len(rollout_sigmas), generator=gens[g])[:t_train] for g in ids])
        # Clones: hosts may have made these under inference mode, which autograd cannot save.
        cond_all = session.encode(prompts).clone()
        x0_all = x0_all.clone()
        bar = ctx.progress(n_local_pairs, "NFT update")
        done = 0
        with _training_mode(model, s.gradient_checkpointing), trained_forward(policy):
            for b0 in range(0, n, s.micro_batch):
                x0 = x0_all[b0:b0 + s.micro_batch]
                cond = cond_all.index(list(range(b0, b0 + x0.shape[0])))
                r = r_all[b0:b0 + x0.shape[0]].to(policy.device)
                for j in range(t_train):
                    ctx.check_interrupt()
                    t = rollout_sigmas[choice[b0:b0 + x0.shape[0], j]].to(policy.device)
                    eps = torch.cat([torch.randn((1, *x0.shape[1:]), generator=gens[g])
                                     for g in ids[b0:b0 + x0.shape[0]]]).to(policy.device)
                    x_t = noised(x0, eps, t)
                    with torch.no_grad():
                        with use_adapter(model, SAMPLING):
                            v_old = policy.velocity(model, x_t, t, cond).float()
                        v_ref = None
                        if s.kl_coef > 0:
                            with adapters_disabled(model):
                                v_ref = policy.velocity(model, x_t, t, cond).float()
                    v = policy.velocity(model, x_t, t, cond).float()
                    out = nft_loss(v, v_old, v_ref, x_t, x0, t, r, beta=s.beta, kl_coef=s.kl_coef)
                    if not torch.isfinite(out.loss):
                        stats["skipped_nonfinite"] += 1
                    else:
                        (out.loss / n_pairs).backward()
                        sums += torch.tensor([out.loss.item(), out.kl.item(), 1.0], dtype=torch.float64)
                    done += 1
                    bar.update(done, n_local_pairs)
        bar.close()
    _sum_gradients(params)
    dp.sum_(sums)
    stats["skipped_nonfinite"] = int(dp.sum_(torch.tensor(stats["skipped_nonfinite"])))
    loss_sum, kl_sum, pairs_done = sums[0].item(), sums[1].item(), int(sums[2].item())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip).item()
    stats["grad_norm"] = grad_norm
    stats["stepped"] = int(bool(pairs_done) and math.isfinite(grad_norm))
    if stats["stepped"]:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats["loss"] = loss_sum / pairs_done if pairs_done else math.nan
    stats["kl"] = kl_sum / pairs_done if pairs_done else math.nan
    # Sampling policy follows the trained one (almost fully on-policy at first), then the EMA. Both
    # schedules count optimizer steps taken so far, this one included: 1 at the first update.
    step = session.iteration + 1
    current = adapter_state(model, TRAINED)
    old = adapter_state(model, SAMPLING)
    blend_(old, current, old_decay(step))
    load_adapter_state(model, SAMPLING, old)
    blend_(session.ema, current, ema_decay(step))
    stats["time_train"] = time.perf_counter() - start
    return stats
