"""Noise processes: from a clean latent x0, noise eps and a training timestep index k to the denoiser's
input, its timestep argument and its regression target (docs/design.md §8).

Every process indexes training timesteps by an integer k in [0, N), larger k = noisier, so the
timestep samplers (uniform, skewed bins, logit-normal) and Kang et al.'s SNR weights are shared.

- `ddpm` (SD 1.x/2.x, SDXL): x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps; target eps, v or x0 by the
  scheduler's `prediction_type`; the denoiser sees t = k. SNR(k) = abar_k / (1 - abar_k), with abar
  clamped to >= 2^-24 as diffusers' schedulers do for zero-terminal-SNR schedules (Lin et al. 2024).
- `flow` (SD3/SD3.5, Flux; rectified flow, Esser et al. 2024): x_t = (1 - s) x0 + s eps with
  s = sigma_k, the scheduler's training sigmas (shifted by its `shift`, or by the resolution-dependent
  mu of Flux's dynamic shifting) sorted ascending; target v = eps - x0; the denoiser sees s * N.
  SNR(s) = ((1 - s) / s)^2.

`weighting_basis()` is what `timesteps.weighting=snr` min-maxes (`xdpo.objectives.timesteps`):
1 / sqrt(SNR) for DDPM (Kang et al. 2025), sigma for flow, where 1 / sqrt(SNR) = s / (1 - s) diverges at
s = 1 (docs/math.md §7). `timesteps.weighting=dense` reads the index k itself: uniform in DDPM's t and in
the flow's unshifted time, the axes their samplers space their steps evenly on.

`to_epsilon` re-expresses a prediction as a noise prediction, for `loss.error_space=epsilon`:
v-errors are eps-errors times 1 / abar_k-dependent factors (1 at k = 0, ~215 at k = 999 on SD's schedule
for the squared error), flow v-errors are eps-errors / (1 - s)^2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError

ZERO_SNR_ABAR = 2.0**-24
"""The smallest abar: diffusers' schedulers set a zero terminal abar to 2^-24 (finite SNR and sigma)."""


def _bcast(x: Tensor, like: Tensor) -> Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


class DDPMProcess:
    """Discrete-time diffusion (DDPM/DDIM training), as SD 1.x/2.x and SDXL are trained."""

    kind = "ddpm"

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(
                f"scheduler prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction, sample)"
            )
        self.num_steps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()

    def _ab(self, k: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(k.device)[k]
        return _bcast(abar.sqrt(), like), _bcast((1 - abar).sqrt(), like)

    def noise(self, x0: Tensor, eps: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, target) for integer timesteps k (one per sample)."""
        a, b = self._ab(k, x0)
        x_t = a * x0 + b * eps
        if self.prediction_type == "epsilon":
            return x_t, eps
        if self.prediction_type == "v_prediction":
            return x_t, a * eps - b * x0  # v (Salimans & Ho 2022)
        return x_t, x0

    def model_timestep(self, k: Tensor) -> Tensor:
        return k

    def to_epsilon(self, pred: Tensor, x_t: Tensor, k: Tensor) -> Tensor:
        """The noise prediction implied by `pred`: v -> a v + b x_t; x0 -> (x_t - a x0) / b."""
        if self.prediction_type == "epsilon":
            return pred
        a, b = self._ab(k, x_t)
        if self.prediction_type == "v_prediction":
            return a * pred.float() + b * x_t.float()
        return (x_t.float() - a * pred.float()) / b

    def snr(self) -> Tensor:
        """SNR(k) = abar_k / (1 - abar_k) for every k, float64 [N], > 0: abar is clamped to >= 2^-24 as
        diffusers' schedulers clamp a zero terminal abar (`rescale_betas_zero_snr`)."""
        a = self.alphas_cumprod.clamp(min=ZERO_SNR_ABAR)
        return a / (1 - a)

    def weighting_basis(self) -> Tensor:
        """1 / sqrt(SNR(k)), float64 [N] (Kang et al. 2025's timestep weight before its min-max)."""
        return self.snr().rsqrt()

    def noise_level(self, k: Tensor) -> Tensor:
        """sqrt(1 - abar_k) in [0, 1] (the weight of eps in x_t)."""
        return (1 - self.alphas_cumprod.to(k.device)[k]).sqrt().float()


class FlowProcess:
    """Rectified flow matching (SD3 / Flux training), on the scheduler's shifted sigmas.

    The sigmas are those `FlowMatchEulerDiscreteScheduler.set_timesteps` gives for N = num_train_timesteps
    steps at the training resolution: the static `shift`, or the dynamic shift by mu (the family's, else
    FluxPipeline's `calculate_shift`) with the scheduler's own `time_shift` (`time_shift_type` exponential
    or linear), then its `stretch_shift_to_terminal` when `shift_terminal` is set. A multistep solver on
    flow sigmas (`use_flow_sigmas`: Wan's UniPC, shift `flow_shift`) gives its own `set_timesteps(N)`
    sigmas. `invert_sigmas` is refused; the inference spacings (`use_karras_sigmas`, ...) only place a
    sampler's steps and do not apply."""

    kind = "flow"

    def __init__(self, scheduler: Any, image_seq_len: int | None = None, mu: float | None = None) -> None:
        cfg = scheduler.config
        if cfg.get("invert_sigmas", False):
            raise ConfigError(
                "model.pretrained: its flow scheduler sets invert_sigmas (sigma runs from clean to noise), "
                "which xdpo does not train"
            )
        self.scheduler = scheduler
        self.num_steps = n = int(cfg.num_train_timesteps)
        if cfg.get("use_flow_sigmas", False):  # a multistep solver on flow sigmas (Wan's UniPC)
            self.sigmas = _solver_sigmas(scheduler, n, mu)
            return
        s = torch.arange(1, n + 1, dtype=torch.float64) / n  # ascending, as the scheduler's before shifting
        if cfg.get("use_dynamic_shifting", False):
            if image_seq_len is None and mu is None:
                raise ConfigError("a dynamically shifted flow scheduler needs the image sequence length")
            mu = _dynamic_mu(cfg, image_seq_len) if mu is None else mu  # mu: the family's own (FLUX.2)
            s = scheduler.time_shift(mu, 1.0, s)  # exponential or linear
        else:
            shift = float(cfg.get("shift", 1.0))
            s = shift * s / (1 + (shift - 1) * s)
        if cfg.get("shift_terminal"):  # the scheduler's stretch works on descending sigmas
            s = scheduler.stretch_shift_to_terminal(s.flip(0)).flip(0)
        self.sigmas = s  # [N], float64, sigma_k for k = 0 (cleanest) .. N-1 (noisiest, = 1)

    def sigma(self, k: Tensor) -> Tensor:
        return self.sigmas.to(k.device)[k]

    def noise(self, x0: Tensor, eps: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        s = _bcast(self.sigma(k), x0)
        return (1 - s) * x0 + s * eps, eps - x0

    def model_timestep(self, k: Tensor) -> Tensor:
        return (self.sigma(k) * self.num_steps).float()

    def to_epsilon(self, pred: Tensor, x_t: Tensor, k: Tensor) -> Tensor:
        """eps = x_t + (1 - s) v."""
        s = _bcast(self.sigma(k), x_t)
        return x_t.float() + (1 - s) * pred.float()

    def snr(self) -> Tensor:
        """SNR(s) = ((1 - s) / s)^2 (docs/design.md §8); s = 1 is clipped to 1 - 1/N so it stays > 0."""
        s = self.sigmas.clamp(max=1 - 1 / self.num_steps)
        return ((1 - s) / s) ** 2

    def weighting_basis(self) -> Tensor:
        """sigma_k, float64 [N]: bounded, unlike 1 / sqrt(SNR) = s / (1 - s), whose min-max is ~0 everywhere
        but at s = 1 (E lambda = 1.005 under SD3's logit-normal timesteps; docs/math.md §7)."""
        return self.sigmas.clone()

    def noise_level(self, k: Tensor) -> Tensor:
        return self.sigma(k).float()


def _solver_sigmas(scheduler: Any, n: int, mu: float | None) -> Tensor:
    """Ascending float64 sigmas [n] of a flow-sigma solver's own `set_timesteps(n)` (on a copy of it)."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
    return copy.sigmas[:n].double().flip(0)


def _dynamic_mu(cfg: Any, image_seq_len: int) -> float:
    """Flux's resolution-dependent shift: mu linear in the image token count (FluxPipeline's own
    `calculate_shift`, with the scheduler config's lengths and shifts)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
    )  # fmt: skip


PROCESSES = {"ddpm": DDPMProcess, "flow": FlowProcess}
