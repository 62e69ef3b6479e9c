"""Timestep sampling and weighting: Kang et al., "Rethinking DPO in Diffusion Models" (AAAI-26), and the
temporal discount of DenseReward (Yang et al., ICML 2024). docs/math.md §7 has the sources and choices.

Timesteps are integer indices t in [0, T), larger = noisier, for every noise process (see
`xdpo.models.noise`: DDPM timesteps, or indices into a flow model's ascending sigma table, which are
uniform in the flow's unshifted time).

Sampling:
- `uniform`: t ~ U{0, ..., T-1}, as Diffusion-DPO.
- `logit_normal`: u = sigmoid(m + s n), n ~ N(0, 1), t = floor(u T) (SD3's training density, Esser et
  al. 2024 §3.1, on the noise level u before the scheduler's shift; flow_grpo's SD3 DPO uses (0, 1)).
- `skewed`: Kang et al.'s Cat(gamma^k): [0, T) split into K equal bins; bin k (k = 0 the noisiest, i.e.
  the highest t) drawn with probability gamma^k / sum_j gamma^j, then t uniform inside the bin. The paper
  leaves K open: K = 10 by default (its ten evaluation intervals); K = 50 is DenseReward's grid.

Weighting (`weight_tables`):
- `snr`, inside the outer loss (it multiplies beta, Kang et al.'s lambda(t) of Eq. 6):
  lambda(t) = 1 + minmax(b(t)) in [1, 2], the min-max over the process's T timesteps, b its
  `weighting_basis()`: 1 / sqrt(SNR(t)) for DDPM (Kang et al.), sigma for flow matching (ours).
- `dense`, outside the outer loss (a per-row loss weight applied by the training step): DenseReward's
  discount gamma^k over its N = 50 sampler steps (k = 0 the first, noisiest step), as the importance
  weight that turns uniform t into its sampling distribution: w(t) = gamma^k(t) / E_uniform[gamma^k]
  (= N gamma^k / C, C = sum_k gamma^k, when N divides T), mean 1 under uniform t.
- `constant`: none.
`timesteps.normalize` divides the weight by its mean under the configured sampler (exact, from
`timestep_probabilities`), so that turning it on leaves the effective beta (or the loss scale) as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DENSE_STEPS = 50
"""N: DenseReward's sampler steps (DDIM, 50 steps) over which its discount gamma^k counts."""


def bin_probabilities(bins: int, gamma: float) -> Tensor:
    """p_k = gamma^k / sum_j gamma^j for k = 0 (noisiest) .. K-1."""
    p = gamma ** torch.arange(bins, dtype=torch.float64)
    return p / p.sum()


def bin_edges(num_train_timesteps: int, bins: int) -> Tensor:
    """Bin j covers [edges[j], edges[j+1]) (j = 0 the cleanest; its step index is k = K - 1 - j)."""
    return torch.linspace(0, num_train_timesteps, bins + 1).round().long()


def step_index(num_train_timesteps: int, bins: int) -> Tensor:
    """k(t) for every t: the index of t's bin counted from the noisiest (k = 0 holds t = T - 1) [T]."""
    edges = bin_edges(num_train_timesteps, bins)
    j = torch.bucketize(torch.arange(num_train_timesteps), edges[1:], right=True)
    return bins - 1 - j


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    *,
    sampling: str = "uniform",
    bins: int = 10,
    gamma: float = 0.9,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """n integer timesteps in [0, T) by `sampling` (uniform | skewed | logit_normal)."""
    T = num_train_timesteps
    if sampling == "uniform":
        return torch.randint(0, T, (n,), generator=generator, device=device)
    if sampling == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
        return (u * T).long().clamp_(0, T - 1)
    if sampling != "skewed":
        raise ValueError(f"unknown timestep sampling {sampling!r} (uniform, skewed, logit_normal)")
    edges = bin_edges(T, bins)
    probs = bin_probabilities(bins, gamma).to(device=device, dtype=torch.float32)
    k = torch.multinomial(probs, n, replacement=True, generator=generator)  # 0 = noisiest
    j = bins - 1 - k
    lo, hi = edges.to(device)[j], edges.to(device)[j + 1]
    u = torch.rand(n, generator=generator, device=device)
    return torch.minimum(lo + (u * (hi - lo).float()).long(), hi - 1)


def timestep_probabilities(
    num_train_timesteps: int,
    sampling: str,
    *,
    bins: int = 10,
    gamma: float = 0.9,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """P(t) of `sample_timesteps` for every t (float64 [T], sums to 1), in closed form."""
    T = num_train_timesteps
    if sampling == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if sampling == "skewed":
        edges = bin_edges(T, bins)
        width = (edges[1:] - edges[:-1]).double()  # [K], bin j
        per_bin = bin_probabilities(bins, gamma).flip(0) / width  # bin j has k = K - 1 - j
        j = bins - 1 - step_index(T, bins)
        return per_bin[j]
    if sampling == "logit_normal":  # floor(u T) = t  <=>  t / T <= u < (t + 1) / T
        u = torch.arange(T + 1, dtype=torch.float64) / T
        z = (torch.logit(u) - mean) / std  # -inf at u = 0, +inf at u = 1
        cdf = 0.5 * torch.erfc(-z / math.sqrt(2))
        return cdf[1:] - cdf[:-1]
    raise ValueError(f"unknown timestep sampling {sampling!r} (uniform, skewed, logit_normal)")


def minmax_lambda_table(basis: Tensor) -> Tensor:
    """lambda(t) = 1 + minmax(basis(t)) for every t of the process (float32, shape [T]); `basis` is the
    process's `weighting_basis()` and must be finite."""
    b = basis.double()
    if not bool(torch.isfinite(b).all()):
        raise ValueError("timestep weighting: the weighting basis has non-finite entries")
    return (1 + (b - b.min()) / (b.max() - b.min())).float()


def snr_lambda_table(snr: Tensor) -> Tensor:
    """lambda(t) = 1 + minmax(1/sqrt(SNR(t))) for every t (float32, shape [T]): Kang et al.'s weight."""
    return minmax_lambda_table(snr.double().rsqrt())


def dense_weight_table(num_train_timesteps: int, discount: float, steps: int = DENSE_STEPS) -> Tensor:
    """DenseReward's discount as a loss weight for every t (float32 [T]): w(t) = gamma^k(t) / mean_t
    gamma^k(t), k(t) the sampler step of t (0 = the noisiest of `steps`); = N gamma^k / C when N | T."""
    if steps > num_train_timesteps:
        raise ValueError(
            f"timesteps.weighting=dense: {steps} sampler steps for {num_train_timesteps} timesteps"
        )
    g = discount ** step_index(num_train_timesteps, steps).double()
    return (g / g.mean()).float()


def timestep_weights(timesteps: Tensor, weighting: str, table: Tensor | None) -> Tensor | None:
    """Per-sample weight from a weighting's table (None for constant weighting)."""
    if weighting == "constant":
        return None
    if weighting not in ("snr", "dense") or table is None:
        raise ValueError(f"unknown timestep weighting {weighting!r} (constant, snr, dense)")
    return table.to(timesteps.device)[timesteps]


@dataclass
class WeightTables:
    """The run's timestep weights, one value per t: `lam` multiplies beta inside the outer loss (snr),
    `loss` multiplies each row's loss (dense); `mean` is the weight's mean under the configured sampler
    before `normalize` (1 for constant weighting)."""

    lam: Tensor | None
    loss: Tensor | None
    mean: float
    normalized: bool

    def describe(self, weighting: str, sampling: str) -> str:
        if weighting == "constant":
            return f"timesteps {sampling}/constant"
        where = "beta" if self.lam is not None else "the loss"
        after = "normalised to 1" if self.normalized else "not normalised"
        return f"timesteps {sampling}/{weighting} (E w = {self.mean:.4g} on {where}, {after})"


def weight_tables(ts: Any, process: Any) -> WeightTables:
    """The tables of `timesteps` (sampling already resolved) on `process` (its T and weighting basis)."""
    T = process.num_steps
    if ts.weighting == "constant":
        return WeightTables(None, None, 1.0, ts.normalize)
    if ts.weighting == "snr":
        table = minmax_lambda_table(process.weighting_basis())
    elif ts.weighting == "dense":
        table = dense_weight_table(T, ts.discount)
    else:
        raise ValueError(f"unknown timestep weighting {ts.weighting!r} (constant, snr, dense)")
    p = timestep_probabilities(T, ts.sampling, bins=ts.bins, gamma=ts.gamma, mean=ts.mean, std=ts.std)
    mean = float((p * table.double()).sum())
    if ts.normalize:
        table = (table.double() / mean).float()
    if ts.weighting == "snr":
        return WeightTables(table, None, mean, ts.normalize)
    return WeightTables(None, table, mean, ts.normalize)
