"""`sample`: seeds (or noise) + conditioning -> clean latents, in micro-batches."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..models.base import Conditioning, FlowPolicy
from .solvers import get_solver

ProgressFn = Callable[[int, int], None]


@torch.no_grad()
def sample(policy: FlowPolicy, model: nn.Module, cond: Conditioning, seeds_or_noise: Sequence[int] | Tensor,
           steps: int, solver: str | None = None, sigmas: Tensor | None = None, return_trajectory: bool = False,
           progress: ProgressFn | None = None, batch_size: int | None = None, height: int | None = None,
           width: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate the flow ODE from noise (sigma = 1) to clean latents (sigma = 0).

    seeds_or_noise: integer seeds, as a list or an integer tensor (noise from `policy.initial_noise`,
        one generator per seed), or a float noise tensor [B, C, h, w].
    cond: one row per sample, or a single row shared by all samples.
    solver: "euler" or "dpm2"; default the family's (`policy.default_solver`).
    sigmas: a custom schedule (steps + 1 values ending at 0); default `policy.sigmas(steps, h, w)`.
    batch_size: micro-batch size (default: all at once). A sample's noise depends on its seed
        only (bit for bit); its result is independent of the micro-batching and of which other
        samples share its batch up to the rounding of batch-size-dependent matmul kernels (at most
        7e-7 on CPU fp32 in the tests: one sample alone vs inside a batch of 24).
    progress: called as progress(done_steps, total_steps) after every model step over all batches.
    Returns x0 latents [B, C, h, w] (float32); with return_trajectory, also the states at every
    sigma, [steps + 1, B, C, h, w] (trajectory[0] is the noise, trajectory[-1] the result).
    """
    if isinstance(seeds_or_noise, Tensor) and seeds_or_noise.is_floating_point():
        noise = seeds_or_noise.to(policy.device, torch.float32)
    elif isinstance(seeds_or_noise, Tensor):  # an integer tensor holds seeds
        noise = policy.initial_noise(seeds_or_noise.flatten().tolist(), height, width)
    else:
        noise = policy.initial_noise(list(seeds_or_noise), height, width)
    n = noise.shape[0]
    if len(cond) == 1 and n > 1:
        cond = cond.index([0] * n)
    if len(cond) != n:
        raise ValueError(f"conditioning has {len(cond)} rows but there are {n} samples: pass one row per sample "
                         f"(cond.index(...)) or a single row")
    if sigmas is None:
        h, w = policy.image_size_of(noise)
        sigmas = policy.sigmas(steps, h, w)
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    steps = len(sigmas) - 1
    solve = get_solver(solver or policy.default_solver)

    batch_size = batch_size or n
    total = steps * ((n + batch_size - 1) // batch_size)
    done = 0
    results, trajectories = [], []
    for start in range(0, n, batch_size):
        x = noise[start:start + batch_size]
        c = cond.index(list(range(start, start + x.shape[0])))
        states = [x.float()] if return_trajectory else None

        def velocity(xt: Tensor, sigma: Tensor, c: Conditioning = c) -> Tensor:
            return policy.velocity(model, xt, sigma.expand(xt.shape[0]), c)

        def on_step(i: int, xt: Tensor, states: list | None = states) -> None:
            nonlocal done
            done += 1
            if states is not None:
                states.append(xt)
            if progress is not None:
                progress(done, total)

        results.append(solve(velocity, x, sigmas, on_step))
        if states is not None:
            trajectories.append(torch.stack(states))
    x0 = torch.cat(results)
    if return_trajectory:
        return x0, torch.cat(trajectories, dim=1)
    return x0
