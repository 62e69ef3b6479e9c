"""One micro-step on a rollout batch (online groups with advantages; `xdpo.train.rollouts`).

  latents (the sampler's clean samples) and conditions -> t: the batch's grid timesteps, or the run's
  sampler -> eps: one per image, or one per group (`noise="group"`: shared by its K images) -> the
  reference's and the initial model's predictions (when the objective needs them, no autograd) -> the
  policy's prediction -> errors, predictions, advantages and groups -> the objective's loss.
x0_scale: c with x0_hat - x0 = -c (prediction - target): flow sigma; DDPM eps-prediction
sqrt(1 - abar) / sqrt(abar), v-prediction sqrt(1 - abar), x0-prediction 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xdpo.data.batch import Batch
from xdpo.data.encode import encode
from xdpo.objectives import LossInput
from xdpo.objectives.timesteps import sample_timesteps
from xdpo.train.errors import space_error
from xdpo.train.step import StepContext, StepOutput, step_weight


def x0_scale(process: object, t: Tensor) -> Tensor:
    """c(t) of the module docstring, per image."""
    s = process.noise_level(t)
    if process.kind == "flow":
        return s
    kind = process.prediction_type
    if kind == "epsilon":
        return s / (1 - s**2).clamp(min=1e-12).sqrt()
    return s if kind == "v_prediction" else torch.ones_like(s)


def rollout_step(m: StepContext, batch: Batch, gen: torch.Generator) -> StepOutput:
    """Latents and conditions -> (t, eps) per image or group -> predictions -> the objective's loss."""
    ts, proc, obj, ref_model = m.timesteps, m.process, m.objective, m.reference
    enc = encode(m.comps, batch, gen, m.sample_posterior)
    latents = enc.latents
    dev = latents.device
    group = batch.extras["group"].to(dev)
    units = group if obj.noise == "group" else torch.arange(latents.shape[0], device=dev)
    n_units = int(units.max()) + 1
    t = batch.extras["timestep"].to(dev)  # per image, the same within a unit
    if (t < 0).any():  # no grid positions: the run's timestep sampler, one draw per unit
        t = sample_timesteps(
            n_units, proc.num_steps, sampling=ts.sampling, bins=ts.bins, gamma=ts.gamma,
            mean=ts.mean, std=ts.std, generator=gen, device=dev,
        )[units]  # fmt: skip
    eps = torch.randn((n_units, *latents.shape[1:]), device=dev, generator=gen)[units]
    noisy, target = proc.noise(latents, eps, t)
    model_t = proc.model_timestep(t)

    def errors(pred: Tensor) -> Tensor:
        return space_error(proc, m.error_space, m.error_reduction, pred, noisy, t, eps, target)

    ref_pred = ref = init_pred = init_err = None
    if obj.needs_reference:
        with m.frozen(), m.autocast():
            ref_pred = ref_model.predict(noisy, model_t, enc.reference_cond)
        ref_pred = ref_pred.clone()  # leave inference mode: a normal tensor
        ref = errors(ref_pred)
    if obj.initial(m.params):
        with m.frozen(), m.autocast():
            init_pred = ref_model.initial_predict(noisy, model_t, enc.reference_cond)
        init_pred = init_pred.clone()
        init_err = errors(init_pred)
    pred = m.comps.family.predict(m.policy, noisy, model_t, enc.cond)
    err = errors(pred)
    weight = step_weight(m, t)
    inp = LossInput(
        err=err, ref=ref, pairs=False, label=None, weight=weight, t=t,
        sigma=proc.noise_level(t) if obj.needs_t else None, state=m.state, gather=m.gather,
        advantage=batch.extras["advantage"].to(dev), group=group,
        pred=pred if obj.predictions else None, target=target if obj.predictions else None,
        ref_pred=ref_pred, init_pred=init_pred, init_err=init_err, x0_scale=x0_scale(proc, t),
    )  # fmt: skip
    out = obj.loss(inp, **m.params)
    return StepOutput(out, t, weight)
