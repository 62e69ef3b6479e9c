"""The divergence check of the periodic reference: D of a candidate from the initial model on a fixed probe set.

pred_mse:  mean_{C,H,W} (pred_candidate - pred_initial)^2 — the forward-process approximation of
           KL(p_candidate || p_initial) (Kang et al. 2025, Eq. 7-8; the Gaussian reverse steps share their
           variance, so their KL is proportional to the squared difference of predictions), without the
           time weighting, in the per-element units of the loss.
error_gap: e_candidate - e_initial — the difference of denoising errors (can be negative).
The probe set is `reference.probe_size` preferred images drawn once from the data (seeded, apart from the
training order); each estimate draws `probe_draws` fresh (t, eps) per image, and the per-image values are
gathered from all processes, so every process decides alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdpo.train.batches import mix_seed
from xdpo.train.errors import per_sample_error

Predict = Callable[[Tensor, Tensor, dict], Tensor]


@dataclass
class Probe:
    """This process's share of the probe set and what a divergence estimate needs of the run."""

    latents: Tensor  # [K, C, h, w]
    cond: dict[str, Tensor]
    process: Any
    error_space: str = "native"
    error_reduction: str = "mean"
    autocast: Callable = torch.autocast
    frozen: Callable = torch.inference_mode
    gather: Callable[[Tensor], Tensor] = lambda x: x  # noqa: E731
    rank: int = 0

    def divergence(
        self,
        candidate: Predict,
        initial: Predict,
        latents: Tensor,
        cond: dict,
        gen: torch.Generator,
        estimator: str,
    ) -> Tensor:
        """Per-sample divergence of the candidate from the initial model, fresh uniform t and eps."""
        proc = self.process
        k = latents.shape[0]
        t = torch.randint(0, proc.num_steps, (k,), device=latents.device, generator=gen)
        eps = torch.randn(latents.shape, device=latents.device, generator=gen)
        noisy, target = proc.noise(latents, eps, t)
        model_t = proc.model_timestep(t)
        with self.frozen(), self.autocast():
            p_c, p_i = candidate(noisy, model_t, cond), initial(noisy, model_t, cond)
            if self.error_space == "epsilon":
                p_c, p_i, target = proc.to_epsilon(p_c, noisy, t), proc.to_epsilon(p_i, noisy, t), eps
            r = self.error_reduction
            if estimator == "pred_mse":
                d = per_sample_error(p_c, p_i, r)
            else:
                d = per_sample_error(p_c, target, r) - per_sample_error(p_i, target, r)
        return d.clone()

    def estimate(
        self,
        candidate: Predict,
        initial: Predict,
        *,
        step: int,
        seed: int,
        draws: int,
        chunk: int,
        estimator: str,
    ) -> tuple[float, float]:
        """D and its standard error over the probe set of all processes, `draws` (t, eps) per image."""
        values = []
        for draw in range(draws):
            gen = torch.Generator(self.latents.device).manual_seed(
                mix_seed(seed, step, 1 << 30, draw, self.rank)
            )
            for i in range(0, self.latents.shape[0], chunk):
                part = {k: v[i : i + chunk] for k, v in self.cond.items()}
                values.append(
                    self.divergence(candidate, initial, self.latents[i : i + chunk], part, gen, estimator)
                )
        d = self.gather(torch.cat(values).float()).double()  # every process sees every value: one decision
        se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else float("nan")
        return float(d.mean()), se
