"""Deterministic flow-matching ODE solvers over a decreasing sigma schedule (1 -> 0).

Convention: x_sigma = (1 - sigma) * x0 + sigma * noise, velocity v = noise - x0, so the model's
clean-sample prediction is D = x - sigma * v. Each solver takes `velocity(x, sigma_scalar) -> v`
and calls `on_step(i, x_next)` after step i (for trajectories and progress).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepHook = Callable[[int, Tensor], None]


def euler(velocity: VelocityFn, x: Tensor, sigmas: Tensor, on_step: StepHook | None = None) -> Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i).

    Written exactly as diffusers' FlowMatchEulerDiscreteScheduler.step (float32 latents, 0-dim
    float32 sigmas) so a loop through this function reproduces the pipelines bit for bit.
    """
    x = x.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, sigma)
        x = x + (sigma_next - sigma) * v.float()
        if on_step is not None:
            on_step(i, x)
    return x


def dpm2(velocity: VelocityFn, x: Tensor, sigmas: Tensor, on_step: StepHook | None = None) -> Tensor:
    """DPM-Solver++(2M): second-order multistep solver in data (x0) form for flow matching.

    With alpha = 1 - sigma and log-SNR lambda = log(alpha / sigma), the exact solution of the
    probability-flow ODE from sigma_i to sigma_{i+1}, with the x0 prediction D held constant over
    the step, is

        x_{i+1} = (sigma_{i+1} / sigma_i) * x_i + alpha_{i+1} * (1 - exp(-h_i)) * D,
        h_i = lambda_{i+1} - lambda_i,

    and because alpha + sigma = 1 the coefficient simplifies to (1 - sigma_{i+1} / sigma_i): the
    first-order update is the Euler step. The second-order update replaces D by a linear
    extrapolation in lambda of the last two x0 predictions:

        D = (1 + 1 / (2 r)) * D_i - 1 / (2 r) * D_{i-1},   r = h_{i-1} / h_i.

    The first step (no history) and the last step (sigma_{i+1} = 0, where lambda is infinite and
    the update is simply x = D_i) are first order. A schedule that starts at sigma = 1 has
    lambda_0 = -inf, so r is infinite on the second step and the correction vanishes there too.
    One model evaluation per step, like Euler.
    """
    x = x.float()
    prev_d: Tensor | None = None
    prev_h: float | None = None
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        v = velocity(x, sigmas[i]).float()
        d = x - sigma * v
        if sigma_next <= 0.0:
            x = d
        else:
            h = _log_snr(sigma_next) - _log_snr(sigma)
            if prev_d is not None and prev_h is not None and math.isfinite(prev_h) and math.isfinite(h):
                r = prev_h / h
                d_eff = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev_d
            else:
                d_eff = d
            ratio = sigma_next / sigma
            x = ratio * x + (1 - ratio) * d_eff
            prev_h = h
        prev_d = d
        if on_step is not None:
            on_step(i, x)
    return x


def _log_snr(sigma: float) -> float:
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


SOLVERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "dpm2": dpm2}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}") from None


__all__ = ["SOLVERS", "dpm2", "euler", "get_solver"]
