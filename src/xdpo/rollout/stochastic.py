"""Stochastic sampling with per-step log-probabilities inside a family's own pipeline (docs/math.md §12.1).

`StochasticScheduler` stands in for the pipeline's scheduler for one call: every step still runs the
scheduler's own (deterministic) step, so its internal state advances as usual; at the positions of
`StochasticPlan.sde` its result is replaced by a draw from the Gaussian transition of `xdpo.models.sde`
(Flow-GRPO's SDE on flow sigmas, DDIM with eta > 0 on DDPM schedules), with noise from each image's own
generator (the same draws whatever the batching). At the positions of `StochasticPlan.record` (the steps
that are trained) it keeps the latent before the step, the one after, the transition's log-probability
and its coefficients (a, b, std) and the model timestep, which is what the training step needs to
recompute the log-probability under the current weights.

Samplers: flow pipelines keep their FlowMatchEulerDiscreteScheduler (at noise level 0 the SDE step is its
Euler step); DDPM pipelines sample with diffusers' DDIMScheduler on their scheduler's config (its own
if it already is one), without sample clipping or thresholding, which would make the step non-Gaussian.
A step whose variance is 0 (DDIM's last step onto abar' = 1 when the schedule ends at t = 0) is deterministic:
it is never recorded, so no objective trains on its (infinite) log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError
from xdpo.models.sde import ddim_coefficients, flow_coefficients, log_prob, step_mean

SDE_SEED = 0x5DE5DE  # the SDE noise of an image: a generator seeded with (seed * 1000003 + SDE_SEED) mod 2^63


@dataclass(frozen=True)
class StochasticPlan:
    """Which sampler steps (positions 0..n-1, first = noisiest) are stochastic and which are recorded."""

    sde: tuple[int, ...]
    record: tuple[int, ...]
    noise_level: float = 0.7  # flow: Flow-GRPO's a
    eta: float = 1.0  # DDPM: DDIM's eta


def sde_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1000003 + SDE_SEED) % 2**63)


def stochastic_inner(scheduler: Any) -> Any:
    """The scheduler a stochastic call runs on (module docstring), or a `ConfigError` line."""
    import diffusers

    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        return scheduler
    if name.startswith("FlowMatch") or "flow" in str(scheduler.config.get("prediction_type", "")):
        raise ConfigError(
            f"online.scheduler: stochastic rollouts on flow models use the Euler sampler, not {name}"
        )
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ConfigError(f"online.scheduler: {name} has no DDPM schedule to run DDIM with eta > 0 on")
    return diffusers.DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)


class StochasticScheduler:
    """`inner`'s interface with the stochastic step of the module docstring (one pipeline call)."""

    def __init__(self, inner: Any, plan: StochasticPlan, generators: list[torch.Generator]) -> None:
        self.__dict__.update(inner=inner, plan=plan, generators=generators, position=0, records=[])
        self.__dict__["flow"] = type(inner).__name__.startswith("FlowMatch")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)

    def coefficients(self, i: int, timestep: Any) -> tuple[float, float, float]:
        inner, plan = self.inner, self.plan
        if self.flow:
            s = inner.sigmas.double()
            return flow_coefficients(float(s[i]), float(s[i + 1]), float(s[1]), plan.noise_level)
        t = int(timestep)
        prev = t - inner.config.num_train_timesteps // inner.num_inference_steps
        abar = float(inner.alphas_cumprod[t])
        abar_prev = float(inner.alphas_cumprod[prev]) if prev >= 0 else float(inner.final_alpha_cumprod)
        return ddim_coefficients(abar, abar_prev, plan.eta, inner.config.prediction_type)

    def noise(self, like: Tensor) -> Tensor:
        if len(self.generators) != like.shape[0]:
            raise ValueError(f"{len(self.generators)} generators for {like.shape[0]} latents")
        draws = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(like.device)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, return_dict: bool = True,
             **kwargs: Any) -> Any:  # fmt: skip
        i = self.position
        self.__dict__["position"] = i + 1
        if i not in self.plan.sde:
            return self.inner.step(model_output, timestep, sample, return_dict=return_dict)
        a, b, std = self.coefficients(i, timestep)
        self.inner.step(model_output, timestep, sample, return_dict=False)  # advance its own state
        mean = step_mean(sample, model_output, a, b)
        nxt = mean + std * self.noise(mean)
        if i in self.plan.record and std > 0:  # a deterministic step (std 0) has no likelihood to train
            self.records.append({
                "position": i, "x": sample.detach().float().cpu(), "next": nxt.detach().cpu(),
                "logp": log_prob(nxt, mean, std).cpu(), "a": a, "b": b, "std": std, "t": float(timestep),
            })  # fmt: skip
        out = nxt.to(sample.dtype)
        return (out,) if not return_dict else SimpleNamespace(prev_sample=out)


def stack_records(records: list[dict[str, Any]], unpack: Any = None) -> dict[str, Tensor]:
    """One call's records as tensors: x, next [n, S, ...], logp [n, S] and, per recorded step, position, a,
    b, std, t [S] (float64). `unpack`: packed latents [n, tokens, d] -> [n, C, h, w]."""
    if not records:
        return {}
    fix = unpack or (lambda x: x)
    out = {
        "x": torch.stack([fix(r["x"]) for r in records], dim=1),
        "next": torch.stack([fix(r["next"]) for r in records], dim=1),
        "logp": torch.stack([r["logp"] for r in records], dim=1),
        "position": torch.tensor([r["position"] for r in records], dtype=torch.long),
    }
    for k in ("a", "b", "std", "t"):
        out[k] = torch.tensor([r[k] for r in records], dtype=torch.float64)
    return out
