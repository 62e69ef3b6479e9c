"""What the likelihood-based online objectives (grpo, dpok, d3po) share (docs/math.md §12).

They train on per-step log-probabilities of a stochastic sampler (`xdpo.models.sde`): the rollout engine
samples each round with SDE steps at the positions `Likelihood.steps` gives and records the steps that are
trained; the training step recomputes each recorded step's Gaussian mean under the current weights
(`LossInput.log_prob`, `step_mean`), beside the log-probability recorded at sampling time
(`old_log_prob`) and, when the record asks, the reference's mean and log-probability.

The sampler window (MixGRPO, Li et al. 2025, arXiv 2507.21802, Sec. 3.2-3.3): of the n sampler steps
(position 0 the noisiest), `window` = w > 0 runs SDE steps only at positions [l, l + w) and ODE steps
elsewhere, trains only those, and moves the window by `window_stride` s every `window_every` k rounds:
l(r) = min(s floor(r / k), n - w) (clamped at the last position: our choice where the paper's schedule
would run off the grid); k = 0 keeps it at l = 0, Flow-GRPO-Fast's few SDE steps at the start
(Flow-GRPO's repository, `sde_window_size`). w = 0: every step is an SDE step (Flow-GRPO, DPOK, D3PO),
trained on the first max(1, int(n * train_fraction)) of them (Flow-GRPO's `timestep_fraction`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.output import LossOutput, loss_output, no_clamps


@dataclass(frozen=True)
class Likelihood:
    """What a likelihood-based objective asks of its rollouts and of the training step.

    `steps(n, params, r)`: (SDE positions, trained positions) of round r's sampler of n steps;
    `noise(params)`: (flow noise level a, DDPM eta); `reference(params)`: whether the step computes the
    reference's mean and log-probability (KL terms, DPO's reference); `shared_start`: a group's images
    start from the same initial noise and part only by the sampler's noise (D3PO's pairs)."""

    steps: Callable[[int, dict[str, Any], int], tuple[tuple[int, ...], tuple[int, ...]]]
    noise: Callable[[dict[str, Any]], tuple[float, float]]
    reference: Callable[[dict[str, Any]], bool]
    shared_start: bool = False


def window_steps(n: int, params: dict[str, Any], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(SDE positions, trained positions) of the module docstring."""
    w = int(params.get("window", 0))
    if w <= 0 or w >= n:
        sde = tuple(range(n))
        return sde, sde[: max(1, int(n * float(params.get("train_fraction", 1.0))))]
    every, stride = int(params.get("window_every", 0)), int(params.get("window_stride", 1))
    start = 0 if every <= 0 else min(stride * (r // every), n - w)
    sde = tuple(range(start, start + w))
    return sde, sde


def noise_of(params: dict[str, Any]) -> tuple[float, float]:
    return float(params["noise_level"]), float(params["eta"])


def _kl_weighted(params: dict[str, Any]) -> bool:
    return params["kl_weight"] > 0


KL_TO_REFERENCE = Likelihood(steps=window_steps, noise=noise_of, reference=_kl_weighted)
"""The sampler of GRPO and DPOK: the window's steps, the sections' noise, the reference's step only when
the objective's `kl_weight` > 0 (their KL term to the reference)."""


def sampler_options(noise_level: float, eta: float, fraction: float) -> tuple[Option, ...]:
    """The sampler keys every likelihood objective declares in its section."""
    return (
        Option("noise_level", float, noise_level, "flow models: the SDE's noise level a, sigma_t = a sqrt(t / (1 - t)) "
               "(Flow-GRPO Eq. 9; 0.7 in its paper)", check=lambda v: v > 0, rule="must be > 0"),
        Option("eta", float, eta, "DDPM models: DDIM's eta of the stochastic sampler (1 = DDPM's ancestral "
               "variance, DDPO's and DPOK's)", check=lambda v: 0 < v <= 1, rule="must be in (0, 1]"),
        Option("train_fraction", float, fraction, "without a window: the first share of the sampler's steps "
               "that are trained (Flow-GRPO's timestep_fraction)", check=lambda v: 0 < v <= 1,
               rule="must be in (0, 1]"),
    )  # fmt: skip


def gaussian_kl(mean: Tensor, other: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean, std^2) || N(other, std^2)) per element, averaged over the non-batch dimensions:
    mean_d (mean - other)^2 / (2 std^2) (Flow-GRPO's KL term; `other` detached)."""
    d = mean.float() - other.detach().float()
    s = torch.as_tensor(std, dtype=d.dtype, device=d.device)
    s = s.reshape(-1, *([1] * (d.ndim - 1))) if s.ndim else s
    kl = d**2 / (2 * s**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def ratio_metrics(log_prob: Tensor, old_log_prob: Tensor) -> dict[str, Tensor]:
    """ratio = exp(log_prob - old_log_prob) per row and |ratio - 1| (1 on the first update of a round:
    the ratio-at-start check of docs/math.md §12.2)."""
    ratio = torch.exp(log_prob.detach().float() - old_log_prob.to(log_prob.device).float())
    return {"ratio": ratio, "ratio_dev": (ratio - 1).abs()}


def likelihood_output(loss: Tensor, inp: Any, extra: dict[str, Tensor]) -> LossOutput:
    """The logged quantities, rows = (image, step): reward_w = A (log p_theta - log p_old), reward_l = 0 (so
    `implicit_acc` is the share of rows whose likelihood moved the advantage's way); delta_w = the log-ratio."""
    d = inp.log_prob.detach().float() - inp.old_log_prob.to(inp.log_prob.device).float()
    a = inp.advantage.to(d.device).float()
    zero = torch.zeros_like(d)
    out = loss_output(loss, a * d, zero, no_clamps(d.shape[0], d.device), d, zero)
    out.extra = {**ratio_metrics(inp.log_prob, inp.old_log_prob), **extra}
    return out
