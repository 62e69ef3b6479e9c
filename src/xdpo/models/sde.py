"""Stochastic sampler steps as Gaussian transitions, for the likelihood-based online objectives
(docs/math.md §12.1).

Both samplers below make one step x -> x' a Gaussian whose mean is linear in the current latent x and the
model's output u (velocity, eps, x0 or v), so one form serves sampling and training alike:

    x' ~ N(mean, std^2 I),   mean = a x + b u,   log p(x' | x) = mean_d [ -(x' - mean)^2 / (2 std^2)
                                                                    - log std - log sqrt(2 pi) ]

(the per-element mean over the latent's dimensions, as Flow-GRPO's and DDPO's codes reduce it).

- Flow matching (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, Eq. 9-12): the reverse-time SDE with the
  ODE's marginals, discretised by Euler-Maruyama from sigma to sigma' < sigma (dt = sigma' - sigma < 0):
      x' = x + [u + s^2 / (2 sigma) (x + (1 - sigma) u)] dt + s sqrt(-dt) eps,
      s  = noise_level sqrt(sigma / (1 - sigma))       (sigma = 1 replaced by the grid's second sigma)
  so a = 1 + s^2 dt / (2 sigma), b = (1 + s^2 (1 - sigma) / (2 sigma)) dt, std = s sqrt(-dt). At
  noise_level 0 it is the Euler step x + u dt (FlowMatchEulerDiscreteScheduler's).
- DDPM (DDIM, Song et al. 2021, Eq. 12, with diffusers' `DDIMScheduler.step` variance): from abar to the
  previous abar' with x0_hat, eps_hat from the output by the prediction type,
      std^2 = eta^2 (1 - abar') / (1 - abar) (1 - abar / abar'),
      x' = sqrt(abar') x0_hat + sqrt(1 - abar' - std^2) eps_hat + std eps;
  eta = 0 is DDIM's deterministic step, eta = 1 DDPM's ancestral variance (DDPO's and DPOK's sampler).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def flow_coefficients(
    sigma: float, sigma_next: float, sigma_max: float, noise_level: float
) -> tuple[float, float, float]:
    """(a, b, std) of Flow-GRPO's SDE step from `sigma` to `sigma_next`; `sigma_max`: the grid's second
    sigma, standing in for sigma = 1 (where sqrt(sigma / (1 - sigma)) is infinite), as the authors' code."""
    dt = sigma_next - sigma
    s = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    a = 1 + s**2 / (2 * sigma) * dt
    b = (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return a, b, s * math.sqrt(-dt)


def ddim_coefficients(
    abar: float, abar_prev: float, eta: float, prediction_type: str
) -> tuple[float, float, float]:
    """(a, b, std) of DDIM's step with `eta` (module docstring) for the model's `prediction_type`."""
    var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    std = eta * math.sqrt(max(var, 0.0))
    c = math.sqrt(max(1 - abar_prev - std**2, 0.0))  # the direction's coefficient on eps_hat
    ra, rp, rb = math.sqrt(abar), math.sqrt(abar_prev), math.sqrt(1 - abar)
    if prediction_type == "epsilon":  # x0 = (x - rb u) / ra, eps = u
        return rp / ra, c - rp * rb / ra, std
    if prediction_type == "sample":  # x0 = u, eps = (x - ra u) / rb
        return c / rb, rp - c * ra / rb, std
    if prediction_type == "v_prediction":  # x0 = ra x - rb u, eps = ra u + rb x
        return rp * ra + c * rb, -rp * rb + c * ra, std
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon, sample or v_prediction")


def _col(v: Tensor | float, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def step_mean(x: Tensor, out: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    """a x + b u in float32 (a, b scalars or one per image)."""
    x, out = x.float(), out.float()
    return _col(a, x) * x + _col(b, x) * out


def log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log N(x_next; mean, std^2 I) per image, averaged over the non-batch dimensions ([N], float32)."""
    x_next, mean = x_next.float(), mean.float()
    s = _col(std, mean)
    lp = -((x_next.detach() - mean) ** 2) / (2 * s**2) - torch.log(s) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))
