"""One micro-step of training, for every model family and objective (docs/design.md §2, §8).

  Batch -> Encoded (latents, conditions) [-> losers sampled by the reference, `train/losers.py`] -> (t, eps): one per pair, shared by w and l, or one per image,
  as the objective declares -> reference errors (only if the objective needs them, no autograd) ->
  policy errors (one batched call) -> lambda(t) -> the objective's loss (times the dense loss weight w(t)).
e(x) = mean_{C,H,W} (prediction - target)^2 per image (`errors.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdpo.data.batch import Batch
from xdpo.data.encode import encode
from xdpo.objectives import LossInput, LossOutput, Objective
from xdpo.objectives.timesteps import sample_timesteps
from xdpo.train.errors import space_error


@dataclass
class StepContext:
    """What a step needs: the pipeline parts, the noise process, the policy (as prepared by accelerate),
    the reference (None when the objective runs none), the objective record with its parameters and
    state, and the run's timestep and error settings."""

    comps: Any
    process: Any
    policy: Any
    reference: Any
    objective: Objective
    params: dict[str, Any]
    timesteps: Any  # cfg.timesteps (sampling already resolved)
    error_space: str = "native"
    error_reduction: str = "mean"
    beta_schedule: str = "constant"
    lambda_table: Tensor | None = None
    loss_weight_table: Tensor | None = None  # timesteps.weighting=dense: w(t) on each row's loss
    state: Any = None  # the objective's running state, if it keeps one
    autocast: Callable = nullcontext
    gather: Callable[[Tensor], Tensor] = lambda x: x  # noqa: E731 - identity on one process
    rank: int = 0
    # no-autograd passes (reference, divergence): inference mode, or no_grad under FSDP2 / ZeRO-3, whose
    # forward hooks reuse gathered parameter buffers across passes (inference tensors may not be reused)
    frozen: Callable = torch.inference_mode
    sample_posterior: bool = True  # data.sample_posterior: z ~ the VAE posterior, or its mean
    noise_offset: float = 0.0  # train.noise_offset: eps + offset * n, n ~ N(0, 1) per image and channel
    losers: Callable | None = None  # Objective.losers != "data": (captions, seeds) -> losers' latents


@dataclass
class StepOutput:
    out: LossOutput
    timesteps: Tensor  # [R] per row (pairs: the winners' t)
    weight: Tensor | None  # [R] lambda(t) multiplying beta, or None


def step_weight(m: StepContext, t: Tensor) -> Tensor | None:
    """lambda(t): Kang et al.'s SNR weight and/or Flow-DPO's beta_t / beta = (1 - sigma)^2."""
    w = None if m.lambda_table is None else m.lambda_table.to(t.device)[t]
    if m.beta_schedule == "flow":
        sched = (1 - m.process.noise_level(t)) ** 2
        w = sched if w is None else w * sched
    return w


def train_step(m: StepContext, batch: Batch, gen: torch.Generator) -> StepOutput:
    """Latents and conditions -> (t, eps) -> reference and policy errors -> the objective's loss."""
    if batch.extras and "sde_next" in batch.extras:  # recorded sampler steps: per-step log-probabilities
        from xdpo.train.likelihood_step import likelihood_step

        return likelihood_step(m, batch, gen)
    if batch.extras:  # a rollout batch (online groups with advantages): its own step
        from xdpo.train.rollout_step import rollout_step

        return rollout_step(m, batch, gen)
    ts, proc, obj = m.timesteps, m.process, m.objective
    enc = encode(m.comps, batch, gen, m.sample_posterior)
    if m.losers is not None:  # the step's own losers (SePPO: the reference's samples of the captions)
        from xdpo.train.losers import with_sampled_losers

        enc = with_sampled_losers(m.losers, batch, enc, gen)
    latents, n = enc.latents, enc.latents.shape[0]
    draws = n // 2 if enc.pairs and obj.noise == "pair" else n
    t = sample_timesteps(
        draws, proc.num_steps, sampling=ts.sampling, bins=ts.bins, gamma=ts.gamma,
        mean=ts.mean, std=ts.std, generator=gen, device=latents.device,
    )  # fmt: skip
    eps = torch.randn(latents[:draws].shape, device=latents.device, generator=gen)
    if m.noise_offset:  # diffusers' scripts: a per-channel shift of the noise (Guttenberg 2023)
        eps = eps + m.noise_offset * torch.randn((draws, eps.shape[1], *[1] * (eps.ndim - 2)),
                                                 device=latents.device, generator=gen)  # fmt: skip
    if draws < n:  # one (t, eps) per pair: w and l see the same noise
        t, eps = t.repeat(2), eps.repeat(2, *([1] * (eps.ndim - 1)))
    noisy, target = proc.noise(latents, eps, t)
    model_t = proc.model_timestep(t)

    def errors(pred: Tensor) -> Tensor:
        return space_error(proc, m.error_space, m.error_reduction, pred, noisy, t, eps, target)

    ref = None
    if obj.needs_reference:
        with m.frozen(), m.autocast():
            ref = errors(m.reference.predict(noisy, model_t, enc.reference_cond))
        ref = ref.clone()  # leave inference mode: a normal tensor for autograd
    err = errors(m.comps.family.predict(m.policy, noisy, model_t, enc.cond))
    weight = step_weight(m, t[:draws])
    inp = LossInput(
        err=err, ref=ref, pairs=enc.pairs, label=batch.label, weight=weight, t=t,
        sigma=proc.noise_level(t) if obj.needs_t else None, state=m.state, gather=m.gather,
    )  # fmt: skip
    out = obj.loss(inp, **m.params)
    if m.loss_weight_table is not None:  # outside the outer loss; rows = noise draws (train/rules.py)
        out.loss = out.loss * m.loss_weight_table.to(t.device)[t[:draws]]
    rows = out.loss.shape[0]
    return StepOutput(out, t[:rows], None if weight is None else weight[:rows])
