"""The reference's checks on a fixed probe set: D of a candidate from the initial model, and distances.

Divergence estimators (`reference.divergence`), per probe image x (a preferred image), one (t, eps) draw:
kang:      T * (e_candidate(x) - e_initial(x)) — Kang et al. (AAAI-26) Eq. 8: the reverse KL of the
           candidate's chain from the initial model's, T times the per-step KL difference to the forward
           posterior, which for Gaussian reverse steps of one variance is the signed gap of denoising
           errors (Diffusion-DPO's constant time weighting); T = the process's training timesteps.
           Units: T x the loss's per-element error (mean over C,H,W by default), so Kang et al.'s delta
           = 0.005 (SD1.5) bounds a mean error gap of 5e-6. Signed: only a worse candidate trips it.
pred_mse:  mean_{C,H,W} (pred_candidate - pred_initial)^2 — the KL between the two models' reverse steps
           (their variances shared) without the time weighting, in the per-element units of the loss.
error_gap: e_candidate - e_initial (kang without the factor T).
`distances` measures pred_mse of the reference from the initial model and from the policy at the same
draws (`ref_to_initial`, `ref_to_policy`). The probe set is `reference.probe_size` preferred images drawn
once from the data (seeded, apart from the training order); each estimate draws `probe_draws` fresh
(t, eps) per image, seeded by (seed, step), and the per-image values are gathered from all processes, so
every process decides alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdpo.train.batches import mix_seed
from xdpo.train.errors import per_sample_error

Predict = Callable[[Tensor, Tensor, dict], Tensor]
ESTIMATORS = ("kang", "pred_mse", "error_gap")


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

    def _noised(self, latents: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Fresh uniform t and eps for `latents`: (x_t, model timestep, target, eps, t)."""
        proc = self.process
        t = torch.randint(0, proc.num_steps, (latents.shape[0],), device=latents.device, generator=gen)
        eps = torch.randn(latents.shape, device=latents.device, generator=gen)
        noisy, target = proc.noise(latents, eps, t)
        return noisy, proc.model_timestep(t), target, eps, t

    def _error(self, pred: Tensor, noisy: Tensor, t: Tensor, target: Tensor, eps: Tensor) -> Tensor:
        if self.error_space == "epsilon":
            return per_sample_error(self.process.to_epsilon(pred, noisy, t), eps, self.error_reduction)
        return per_sample_error(pred, target, self.error_reduction)

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
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown divergence estimator {estimator!r} ({', '.join(ESTIMATORS)})")
        noisy, model_t, target, eps, t = self._noised(latents, gen)
        with self.frozen(), self.autocast():
            p_c, p_i = candidate(noisy, model_t, cond), initial(noisy, model_t, cond)
            if estimator == "pred_mse":
                if self.error_space == "epsilon":
                    p_c, p_i = self.process.to_epsilon(p_c, noisy, t), self.process.to_epsilon(p_i, noisy, t)
                d = per_sample_error(p_c, p_i, self.error_reduction)
            else:
                d = self._error(p_c, noisy, t, target, eps) - self._error(p_i, noisy, t, target, eps)
                if estimator == "kang":
                    d = self.process.num_steps * d
        return d.clone()

    def _chunks(self, step: int, seed: int, draws: int, chunk: int) -> Iterator[tuple[Tensor, dict, Any]]:
        """(latents, cond, generator) per chunk and draw, seeded by (seed, step, draw, rank)."""
        for draw in range(draws):
            gen = torch.Generator(self.latents.device).manual_seed(
                mix_seed(seed, step, 1 << 30, draw, self.rank)
            )
            for i in range(0, self.latents.shape[0], chunk):
                yield self.latents[i : i + chunk], {k: v[i : i + chunk] for k, v in self.cond.items()}, gen

    def _mean_se(self, values: list[Tensor]) -> tuple[float, float]:
        d = self.gather(torch.cat(values).float()).double()  # every process sees every value: one decision
        se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else float("nan")
        return float(d.mean()), se

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
        values = [
            self.divergence(candidate, initial, lat, cond, gen, estimator)
            for lat, cond, gen in self._chunks(step, seed, draws, chunk)
        ]
        return self._mean_se(values)

    def errors(self, predict: Predict, *, seed: int, draws: int, chunk: int) -> Tensor:
        """Per-sample denoising errors of `predict` on the probe set of all processes, in the loss's space
        and reduction, `draws` fresh uniform (t, eps) per image (the reference's error level)."""
        values = []
        for lat, cond, gen in self._chunks(0, seed, draws, chunk):
            noisy, model_t, target, eps, t = self._noised(lat, gen)
            with self.frozen(), self.autocast():
                values.append(self._error(predict(noisy, model_t, cond), noisy, t, target, eps).float())
        return self.gather(torch.cat(values))

    def distances(
        self, reference: Predict, others: dict[str, Predict], *, step: int, seed: int, draws: int, chunk: int
    ) -> dict[str, float]:
        """Mean pred_mse of the reference from each of `others` over the probe set (one reference forward
        per chunk, the same (t, eps) draws as `estimate` at this step)."""
        values: dict[str, list[Tensor]] = {name: [] for name in others}
        for lat, cond, gen in self._chunks(step, seed, draws, chunk):
            noisy, model_t, _, _, t = self._noised(lat, gen)
            with self.frozen(), self.autocast():
                p_r = reference(noisy, model_t, cond)
                if self.error_space == "epsilon":
                    p_r = self.process.to_epsilon(p_r, noisy, t)
                for name, predict in others.items():
                    p_o = predict(noisy, model_t, cond)
                    if self.error_space == "epsilon":
                        p_o = self.process.to_epsilon(p_o, noisy, t)
                    values[name].append(per_sample_error(p_r, p_o, self.error_reduction).clone())
        return {name: self._mean_se(v)[0] for name, v in values.items()}
