"""One micro-step on recorded sampler steps (the likelihood objectives; `xdpo.train.rollouts`).

  the latent x before each recorded step and the captions' conditions -> the denoiser's output u at the
  step's model timestep, with classifier-free guidance when the sampler ran it (u = u_0 + g (u_c - u_0),
  u_0 on the empty prompt, as the pipelines' negative prompt) -> the Gaussian mean a x + b u and
  log p(x' | x) of the recorded next latent x' (`xdpo.models.sde`) -> the same for the reference (no
  autograd) when `Likelihood.reference` asks -> the objective's loss.
No noise is drawn: the randomness is the sampler's, recorded in the round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from xdpo.data.batch import Batch
from xdpo.data.encode import encode
from xdpo.models.sde import log_prob, step_mean
from xdpo.objectives import LossInput
from xdpo.train.step import StepContext, StepOutput


def guided(predict: Callable[..., Tensor], x: Tensor, t: Tensor, cond: dict, uncond: dict | None,
           scale: float) -> Tensor:  # fmt: skip
    """The sampler's output: predict(x, t, cond), or u_0 + scale (u_c - u_0) with guidance."""
    out = predict(x, t, cond)
    if uncond is None:
        return out
    u0 = predict(x, t, uncond)
    return u0 + scale * (out - u0)


def likelihood_step(m: StepContext, batch: Batch, gen: torch.Generator) -> StepOutput:
    """Recorded steps -> log-probabilities under the policy (and the reference) -> the objective's loss."""
    obj = m.objective
    enc = encode(m.comps, batch, gen, m.sample_posterior)
    x = enc.latents
    dev, n = x.device, x.shape[0]
    ex = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.extras.items()}
    a, b, std = ex["sde_a"].float(), ex["sde_b"].float(), ex["sde_std"].float()
    model_t, nxt, scale = ex["sde_t"].float(), ex["sde_next"].float(), float(ex["cfg"][0])
    uncond = None
    if scale > 0:
        uncond = encode(m.comps, replace(batch, captions=[""] * n, cond=None), gen, m.sample_posterior).cond

    ref_mean = ref_logp = None
    if obj.likelihood.reference(m.params):
        with m.frozen(), m.autocast():
            ref_out = guided(m.reference.predict, x, model_t, enc.cond, uncond, scale)
        ref_mean = step_mean(x, ref_out, a, b).clone()  # leave inference mode
        ref_logp = log_prob(nxt, ref_mean, std)

    def policy(noisy: Tensor, t: Tensor, cond: dict) -> Tensor:
        return m.comps.family.predict(m.policy, noisy, t, cond)

    mean = step_mean(x, guided(policy, x, model_t, enc.cond, uncond, scale), a, b)
    logp = log_prob(nxt, mean, std)
    t = ex["timestep"]
    inp = LossInput(
        err=-logp, ref=None if ref_logp is None else -ref_logp, pairs=False, label=None, weight=None, t=t,
        state=m.state, gather=m.gather, advantage=ex["advantage"], group=ex["group"], log_prob=logp,
        old_log_prob=ex["sde_logp"].float(), ref_log_prob=ref_logp, step_mean=mean, ref_step_mean=ref_mean,
        step_std=std,
    )  # fmt: skip
    out = obj.loss(inp, **m.params)
    return StepOutput(out, t[: out.loss.shape[0]], None)
