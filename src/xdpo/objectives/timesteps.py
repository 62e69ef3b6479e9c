"""Timestep sampling and weighting (Kang et al. 2025, "Rethinking DPO in Diffusion Models", AAAI-26).

Timesteps are integer indices t in [0, T), larger = noisier, for every noise process (see
`xdpo.models.noise`: DDPM timesteps, or indices into a flow model's ascending sigma table).

- `uniform`: t ~ U{0, ..., T-1}, as Diffusion-DPO.
- `logit_normal`: u = sigmoid(m + s n), n ~ N(0, 1), t = floor(u T) (SD3's training density, Esser et
  al. 2024 §3.1, on the noise level u before the scheduler's shift; flow_grpo's SD3 DPO uses (0, 1)).
- `skewed`: [0, T) is split into K equal bins; bin k (k = 0 the noisiest, i.e. the highest t) is drawn
  with probability gamma^k / sum_j gamma^j, then t is uniform inside the bin. The paper's exact
  indexing is in an appendix we could not read: this is our reading of its main text.
- `snr` weighting: lambda(t) = 1 + minmax(b(t)), the min-max over the scheduler's T timesteps, so lambda
  runs from 2 (noisiest) to 1 (cleanest); lambda multiplies beta inside the outer loss. b is the noise
  process's `weighting_basis()`: 1 / sqrt(SNR(t)) with SNR(t) = abar_t / (1 - abar_t) for DDPM (Kang et
  al.'s definition; abar clamped to >= 2^-24), sigma for flow matching (bounded: 1 / sqrt(SNR) =
  sigma / (1 - sigma) diverges at sigma = 1; docs/math.md §7). `constant`: lambda = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bin_probabilities(bins: int, gamma: float) -> Tensor:
    """p_k = gamma^k / sum_j gamma^j for k = 0 (noisiest) .. K-1."""
    p = gamma ** torch.arange(bins, dtype=torch.float64)
    return p / p.sum()


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
    edges = torch.linspace(0, T, bins + 1).round().long()  # bin j covers [edges[j], edges[j+1])
    probs = bin_probabilities(bins, gamma).to(device=device, dtype=torch.float32)
    k = torch.multinomial(probs, n, replacement=True, generator=generator)  # 0 = noisiest
    j = bins - 1 - k
    lo, hi = edges.to(device)[j], edges.to(device)[j + 1]
    u = torch.rand(n, generator=generator, device=device)
    return torch.minimum(lo + (u * (hi - lo).float()).long(), hi - 1)


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


def timestep_weights(timesteps: Tensor, weighting: str, table: Tensor | None) -> Tensor | None:
    """Per-sample lambda(t) (None for constant weighting)."""
    if weighting == "constant":
        return None
    if weighting != "snr" or table is None:
        raise ValueError(f"unknown timestep weighting {weighting!r} (constant, snr)")
    return table.to(timesteps.device)[timesteps]
