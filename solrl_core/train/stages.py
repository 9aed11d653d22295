"""The four stages of a Sol-RL iteration, as plain functions the nodes call.

explore: N seeds per prompt through the low-precision explorer (D steps), scored (proxy reward).
rank:    keep K per prompt by proxy reward.
regenerate: the same seeds through the full-precision copy (F steps), re-scored; optionally an
         audit of how well the proxy ranked the whole pool.
update:  DiffusionNFT on the kept samples: one optimizer step, then old / EMA updates.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph.context import current_context
from ..models import adapter_state, adapters_disabled, load_adapter_state, use_adapter
from ..models.lora import trainable_parameters
from ..sampling import sample
from .advantages import advantages
from .audit import ranking_agreement
from .nft import nft_loss, noised
from .samples import SampleBatch
from .schedules import blend_, ema_decay, old_decay
from .selection import select
from .session import SAMPLING, TRAINED, TrainingSession


def _stats(prefix: str, values: Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return {f"{prefix}_mean": math.nan}
    return {f"{prefix}_mean": finite.mean().item(), f"{prefix}_max": finite.max().item(),
            f"{prefix}_min": finite.min().item()}


def score(session: TrainingSession, reward, latents: Tensor, prompts: list[str]) -> tuple[Tensor, dict, Tensor]:
    """Decode [B, ...] latents and score them: (total [B], components {name: [B]}, images)."""
    images = session.policy.decode(latents.to(session.policy.device)).float().cpu()
    total, components = reward.score(images, prompts)
    return total.float(), {k: v.float() for k, v in components.items()}, images


def _generate(session: TrainingSession, precision: str, prompts: list[str], seeds: Tensor, steps: int,
              batch_size: int, desc: str) -> Tensor:
    """Sample seeds [P, M] for prompts [P] -> latents [P, M, ...], with progress and interruption."""
    ctx = current_context()
    model = session.inference_model(precision)
    p, m = seeds.shape
    flat_prompts = [prompts[i] for i in range(p) for _ in range(m)]
    cond = session.policy.encode(flat_prompts)
    bar = ctx.progress(steps, desc)

    def progress(done: int, total: int) -> None:
        ctx.check_interrupt()
        bar.update(done, total)

    try:
        x0 = sample(session.policy, model, cond, seeds.flatten().tolist(), steps, batch_size=batch_size,
                    progress=progress)
    finally:
        bar.close()
    return x0.reshape(p, m, *x0.shape[1:])


def _scored_batch(session, reward, prompts, seeds, latents, precision, steps) -> SampleBatch:
    p, m = seeds.shape
    flat_prompts = [prompts[i] for i in range(p) for _ in range(m)]
    total, comps, images = score(session, reward, latents.flatten(0, 1), flat_prompts)
    return SampleBatch(session, prompts, seeds, latents, total.reshape(p, m),
                       {k: v.reshape(p, m) for k, v in comps.items()}, precision, steps,
                       images=images.reshape(p, m, *images.shape[1:]))


def explore(session: TrainingSession, reward, prompts_per_iteration: int, pool: int, steps: int,
            precision: str = "low", batch_size: int = 32) -> SampleBatch:
    start = time.perf_counter()
    prompts = session.next_prompts(prompts_per_iteration)
    seeds = session.draw_seeds(len(prompts), pool)
    latents = _generate(session, precision, prompts, seeds, steps, batch_size, f"explore ({precision})")
    batch = _scored_batch(session, reward, prompts, seeds, latents, precision, steps)
    session.pending.update(_stats("draft_reward", batch.rewards))
    session.pending["draft_dropped"] = int((~torch.isfinite(batch.rewards)).sum())
    session.pending["time_explore"] = time.perf_counter() - start
    return batch


def rank(batch: SampleBatch, keep: int, mode: str = "best_worst") -> SampleBatch:
    start = time.perf_counter()
    session: TrainingSession = batch.session
    idx = select(batch.rewards, keep, mode, generator=session.generator("select"))
    kept = batch.subset(idx)
    session.pending.update(_stats("kept_proxy_reward", kept.rewards))
    session.pending["time_select"] = time.perf_counter() - start
    return kept


def regenerate(batch: SampleBatch, reward, steps: int, batch_size: int = 32, audit_every: int = 0,
               audit_size: int = 16) -> SampleBatch:
    session: TrainingSession = batch.session
    start = time.perf_counter()
    latents = _generate(session, "full", batch.prompts, batch.seeds, steps, batch_size, "regenerate")
    out = _scored_batch(session, reward, batch.prompts, batch.seeds, latents, "full", steps)
    out.proxy_rewards, out.pool_seeds, out.pool_rewards = batch.rewards, batch.pool_seeds, batch.pool_rewards
    session.pending.update(_stats("reward", out.rewards))
    for name, comp in out.components.items():
        if len(out.components) > 1:
            session.pending[f"reward_{name}_mean"] = comp[torch.isfinite(comp)].mean().item()
    session.pending["time_regenerate"] = time.perf_counter() - start
    if audit_every > 0 and session.iteration % audit_every == 0 and batch.pool_seeds is not None:
        session.pending.update(audit(session, batch, reward, steps, audit_size, batch_size))
    return out


def audit(session: TrainingSession, batch: SampleBatch, reward, steps: int, size: int,
          batch_size: int) -> dict[str, float]:
    """Regenerate a random subset of each prompt's draft pool at full precision; compare rankings."""
    start = time.perf_counter()
    pool_seeds, pool_rewards = batch.pool_seeds, batch.pool_rewards
    n = pool_seeds.shape[1]
    size = min(size, n)
    g = session.generator("audit")
    idx = torch.stack([torch.sort(torch.randperm(n, generator=g)[:size]).values for _ in range(len(batch.prompts))])
    seeds = torch.gather(pool_seeds, 1, idx)
    proxy = torch.gather(pool_rewards, 1, idx)
    latents = _generate(session, "full", batch.prompts, seeds, steps, batch_size, "audit")
    full = _scored_batch(session, reward, batch.prompts, seeds, latents, "full", steps).rewards
    stats = {f"audit_{k}": v for k, v in ranking_agreement(proxy, full, k=max(1, size // 4)).items()}
    stats["time_audit"] = time.perf_counter() - start
    return stats


@dataclass
class UpdateSettings:
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    beta: float = 1.0
    kl_coef: float = 1e-4
    train_fraction: float = 0.6
    micro_batch: int = 8

    def optimizer(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.betas), "eps": self.eps}


def update(batch: SampleBatch, s: UpdateSettings,
           on_pair: Callable[[int, int], None] | None = None) -> dict[str, float]:
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
    valid = torch.isfinite(r_opt).flatten()
    flat_prompts = [batch.prompts[i] for i in range(batch.shape[0]) for _ in range(batch.shape[1])]
    prompts = [p for p, ok in zip(flat_prompts, valid.tolist()) if ok]
    x0_all = batch.latents.flatten(0, 1)[valid].to(policy.device, torch.float32)
    r_all = r_opt.flatten()[valid]
    n = x0_all.shape[0]
    stats = {"dropped": int((~valid).sum()), "skipped_nonfinite": 0}
    optimizer = session.get_optimizer(s.optimizer())
    optimizer.zero_grad(set_to_none=True)
    loss_sum, kl_sum, pairs_done = 0.0, 0.0, 0
    if n > 0:
        rollout_sigmas = policy.sigmas(batch.steps, *policy.image_size_of(x0_all[:1]))[:-1].float()
        t_train = max(1, int(len(rollout_sigmas) * s.train_fraction))
        g = session.generator("train")
        choice = torch.stack([torch.randperm(len(rollout_sigmas), generator=g)[:t_train] for _ in range(n)])
        # Clones: hosts may have made these under inference mode, which autograd cannot save.
        cond_all = policy.encode(prompts)._map(torch.clone)
        x0_all = x0_all.clone()
        n_pairs = math.ceil(n / s.micro_batch) * t_train
        bar = ctx.progress(n_pairs, "NFT update")
        params = trainable_parameters(model, TRAINED)
        model.train()
        for b0 in range(0, n, s.micro_batch):
            x0 = x0_all[b0:b0 + s.micro_batch]
            cond = cond_all.index(list(range(b0, b0 + x0.shape[0])))
            r = r_all[b0:b0 + x0.shape[0]].to(policy.device)
            for j in range(t_train):
                ctx.check_interrupt()
                t = rollout_sigmas[choice[b0:b0 + x0.shape[0], j]].to(policy.device)
                eps = torch.randn(x0.shape, generator=g).to(policy.device)
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
                loss = out.loss / n_pairs
                if not torch.isfinite(loss):
                    stats["skipped_nonfinite"] += 1
                else:
                    loss.backward()
                    loss_sum += out.loss.item()
                    kl_sum += out.kl.item()
                    pairs_done += 1
                bar.update(pairs_done + stats["skipped_nonfinite"], n_pairs)
                if on_pair is not None:
                    on_pair(pairs_done, n_pairs)
        bar.close()
        model.eval()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip).item()
        stats["grad_norm"] = grad_norm
        if pairs_done and math.isfinite(grad_norm):
            optimizer.step()
            stats["stepped"] = 1
        else:
            stats["stepped"] = 0
        optimizer.zero_grad(set_to_none=True)
    stats["loss"] = loss_sum / pairs_done if pairs_done else math.nan
    stats["kl"] = kl_sum / pairs_done if pairs_done else math.nan
    # Sampling policy follows the trained one (fully on-policy at first), then the EMA.
    current = adapter_state(model, TRAINED)
    old = adapter_state(model, SAMPLING)
    blend_(old, current, old_decay(session.iteration))
    load_adapter_state(model, SAMPLING, old)
    blend_(session.ema, current, ema_decay(session.iteration))
    stats["time_train"] = time.perf_counter() - start
    return stats
