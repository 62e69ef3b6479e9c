"""AWM, Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050): the pretraining loss on the policy's
own samples, weighted by their advantage (docs/math.md §11.3).

A policy gradient whose per-sample log-likelihood proxy is minus the clean-data denoising loss,
log pi(x0) ~ -w(e), e = mean (v_theta(x_t) - (eps - x0))^2, and the advantage
A = clip(A_group, -c, c) / c in [-1, 1] (the code's stat tracker, c = 5):

    L = mean_i A_i w(e_i) + kl_weight * mean (v_theta - v_initial)^2 + ema_weight * mean (v_theta - v_ref)^2

w(e) = e (`weighting=uniform`, the paper's stated choice) or the code's default generalised Huber
w(e) = ((e + 1e-10)^p - 1e-10^p) t / p, p = 0.25, t the noise level (flow time). The authors' code writes
the policy term in PPO form, max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) with
ratio = exp(log pi - sg(log pi)): on-policy (every round sampled by the current policy) the ratio is 1,
clipping is inert and its gradient is exactly that of A w(e), the form used here (the logged value is
the advantage-weighted loss rather than -A). v_ref is the run's reference (the code's slowly updated
"ema" copy: `reference.strategy=soft`, decay min(0.001 i, 0.3)); v_initial the base model. Each image
trains at `train_timesteps` (6) steps of the rollout sampler's grid, one drawn in each of equal strata
of its first `timestep_fraction` (0.9) (the code's `discrete_wo_init`: the first, pure-noise step never),
each with fresh noise.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.output import LossOutput, mean_square, rollout_output
from xdpo.objectives.record import LossInput, Objective

TINY = 1e-10


def matching_weight(e: Tensor, t: Tensor, weighting: str, p: float) -> Tensor:
    """w(e): e (uniform) or ((e + 1e-10)^p - 1e-10^p) t / p (ghuber)."""
    if weighting == "uniform":
        return e
    return ((e + TINY) ** p - TINY**p) * t.to(e.dtype) / p


def awm_loss(
    err: Tensor,
    advantage: Tensor,
    *,
    t: Tensor,
    weighting: str = "ghuber",
    p: float = 0.25,
    adv_clip: float = 5.0,
    kl_weight: float = 1e-3,
    ema_weight: float = 1.0,
    pred: Tensor | None = None,
    init_pred: Tensor | None = None,
    ref_pred: Tensor | None = None,
) -> Tensor:
    """Per-image loss of the module docstring ([N]); `err` the policy's errors e (with autograd)."""
    dt = torch.promote_types(err.dtype, torch.float32)
    e = err.to(dt)
    a = advantage.to(e.device, dt).clamp(-adv_clip, adv_clip) / adv_clip
    loss = a * matching_weight(e, t.to(e.device, dt), weighting, p)
    if kl_weight > 0:
        loss = loss + kl_weight * mean_square(pred, init_pred, dt)
    if ema_weight > 0:
        loss = loss + ema_weight * mean_square(pred, ref_pred, dt)
    return loss


def _loss(inp: LossInput, *, train_timesteps: int, timestep_fraction: float, **params) -> LossOutput:
    loss = awm_loss(
        inp.err, inp.advantage, t=inp.sigma, pred=inp.pred, init_pred=inp.init_pred, ref_pred=inp.ref_pred,
        **params,
    )  # fmt: skip
    return rollout_output(loss, inp)


def strata(n: int, params: dict, rng: np.random.Generator) -> list[int]:
    """One grid position in each of K strata of [1, int(n * fraction)] (the code's `discrete_wo_init`)."""
    k, top = params["train_timesteps"], max(2, int(n * params["timestep_fraction"]))
    edges = np.linspace(1, top, k + 1).astype(int)
    return [int(rng.integers(lo, max(hi, lo + 1))) % n for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


OPTIONS = (
    Option("weighting", Literal["ghuber", "uniform"], "ghuber", "w(e): ghuber (the code's: ((e + 1e-10)^p - "
           "1e-10^p) t / p) or uniform (e, the paper's)"),
    Option("p", float, 0.25, "ghuber's power (the code's 0.25)", check=lambda v: v > 0, rule="must be > 0"),
    Option("adv_clip", float, 5.0, "c: advantages clipped to [-c, c] and divided by c (the code's 5)",
           check=lambda v: v > 0, rule="must be > 0"),
    Option("kl_weight", float, 1e-3, "weight of mean (v_theta - v_initial)^2 (the code's beta; 1e-4 PickScore, "
           "3e-3 OCR)", check=lambda v: v >= 0, rule="must be >= 0"),
    Option("ema_weight", float, 1.0, "weight of mean (v_theta - v_reference)^2, the reference being the code's "
           "ema copy (ema_beta)", check=lambda v: v >= 0, rule="must be >= 0"),
    Option("train_timesteps", int, 6, "grid steps each image trains at, one per stratum (the code's 6)",
           check=lambda v: v >= 1, rule="must be >= 1"),
    Option("timestep_fraction", float, 0.9, "the strata cover grid steps [1, int(n * fraction)] (the code's 0.9)",
           check=lambda v: 0 < v <= 1, rule="must be in (0, 1]"),
)  # fmt: skip

AWM = Objective(
    name="awm",
    about="AWM: advantage-weighted denoising loss on the policy's own samples, pulled to the base and an EMA",
    loss=_loss,
    needs_reference=True,
    noise="image",
    data=("rollouts",),
    needs_t=True,
    options=OPTIONS,
    predictions=True,
    initial=lambda p: p["kl_weight"] > 0,
    timesteps=strata,
)
