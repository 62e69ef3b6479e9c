"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv 2509.16117): online RL on the forward process (docs/math.md §11.2).

With v_old the sampling (old) policy's prediction, v the target, beta the guidance strength:

    v+ = (1 - beta) v_old + beta v_theta          v- = (1 + beta) v_old - beta v_theta      (Thm 3.2)
    L  = r * D(v+) + (1 - r) * D(v-)                                                        (Eq. 5)

with r in [0, 1] the optimality probability of the image: its group advantage A (reward minus the mean of
its prompt's K images, over the round's reward std) clipped to [-c, c] and mapped r = A / (2c) + 1/2
(Sec. 3.3 with Z = c std; the code's c = 5; c = 1 is the paper's literal Z = std). D is the adaptive,
self-normalised x0 regression of Sec. 3.3, on x0_hat - x0 = -s (v_hat - v) (s = sigma for flow models):

    D(u) = mean((x0_hat(u) - x0)^2) / sg(max(mean|x0_hat(u) - x0|, 1e-5))     (the weight in float64)

or, with `nft.adaptive=false`, D(u) = mean((u - v)^2) (Eq. 5 as printed). The authors' code multiplies the
loss by c / beta and adds kl_weight * mean((v_theta - v_initial)^2) (KL-style pull to the base model,
weight 1e-4); both are kept as defaults (`nft.code_scale`, `nft.kl_weight`; false / 0 is the paper's).
Each image trains on a random share `train_fraction` of the rollout sampler's own grid (App. C), a
fresh eps per (image, step). The old policy is the run's reference (`reference.strategy=soft`, NFT's
eta_i = min(0.001 i, 0.5)), which also samples the rollouts (`samples_with="reference"`). The mixing is
linear in the prediction, so the same loss runs on eps- and v-prediction (DDPM) models with their own
targets and x0 scale (an xdpo extension; the paper states it for velocity).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.output import LossOutput, mean_square, rollout_output
from xdpo.objectives.record import LossInput, Objective


def optimality(advantage: Tensor, clip: float) -> Tensor:
    """r = clip(clip(A, -c, c) / (2c) + 1/2, 0, 1)."""
    a = advantage.clamp(-clip, clip)
    return (a / clip / 2 + 0.5).clamp(0.0, 1.0)


def adaptive_regression(u: Tensor, target: Tensor, x0_scale: Tensor) -> Tensor:
    """D(u) per image: mean(e^2) / sg(max(mean|e|, 1e-5)), e = x0_scale * (u - target) (the x0 error up to
    sign); the weight in float64, as the authors' code."""
    dt = torch.promote_types(u.dtype, torch.float32)
    dims = list(range(1, u.ndim))
    e = (u.to(dt) - target.to(dt)) * x0_scale.to(u.device, dt).view(-1, *([1] * (u.ndim - 1)))
    weight = e.detach().double().abs().mean(dim=dims).clamp(min=1e-5)
    return (e.pow(2).mean(dim=dims) / weight).to(dt)


def nft_loss(
    pred: Tensor,
    old_pred: Tensor,
    target: Tensor,
    advantage: Tensor,
    *,
    x0_scale: Tensor,
    beta: float = 1.0,
    adv_clip: float = 5.0,
    adaptive: bool = True,
    code_scale: bool = True,
    kl_weight: float = 1e-4,
    init_pred: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(per-image loss [N], r [N]) of the module docstring from the predictions [N, ...]."""
    dt = torch.promote_types(pred.dtype, torch.float32)
    new, old = pred.to(dt), old_pred.detach().to(dt)
    pos, neg = (1 - beta) * old + beta * new, (1 + beta) * old - beta * new
    if adaptive:
        d_pos, d_neg = adaptive_regression(pos, target, x0_scale), adaptive_regression(neg, target, x0_scale)
    else:
        d_pos, d_neg = mean_square(pos, target, dt), mean_square(neg, target, dt)
    r = optimality(advantage.to(d_pos.device, dt), adv_clip)
    loss = r * d_pos + (1 - r) * d_neg
    if code_scale:
        loss = loss * (adv_clip / beta)
    if kl_weight > 0:
        loss = loss + kl_weight * mean_square(new, init_pred, dt)
    return loss, r


def _loss(inp: LossInput, *, train_fraction: float, **params: float) -> LossOutput:
    loss, _ = nft_loss(
        inp.pred, inp.ref_pred, inp.target, inp.advantage, x0_scale=inp.x0_scale, init_pred=inp.init_pred, **params
    )  # fmt: skip
    return rollout_output(loss, inp)


def grid_share(n: int, params: dict, rng: np.random.Generator) -> list[int]:
    """A random permutation of the grid's n steps, its first int(n * train_fraction) (at least one)."""
    return [int(i) for i in rng.permutation(n)[: max(1, int(n * params["train_fraction"]))]]


OPTIONS = (
    Option("beta", float, 1.0, "guidance strength of the implicit policies (Sec. 4.4: 1 with one reward, 0.1 "
           "with several)", check=lambda v: v > 0, rule="must be > 0"),
    Option("adv_clip", float, 5.0, "c: advantages clipped to [-c, c], r = A / (2c) + 1/2 (the code's 5; 1 = the "
           "paper's Z = std)", check=lambda v: v > 0, rule="must be > 0"),
    Option("adaptive", bool, True, "adaptive x0 regression weight (Sec. 3.3); false = plain Eq. 5"),
    Option("code_scale", bool, True, "multiply the loss by adv_clip / beta, as the authors' code (not in the paper)"),
    Option("kl_weight", float, 1e-4, "weight of mean (v_theta - v_initial)^2 (the code's train.beta; paper: 0)",
           check=lambda v: v >= 0, rule="must be >= 0"),
    Option("train_fraction", float, 0.99, "share of the rollout's sampler steps each image trains on (the code's "
           "timestep_fraction)", check=lambda v: 0 < v <= 1, rule="must be in (0, 1]"),
)  # fmt: skip

NFT = Objective(
    name="nft",
    about="DiffusionNFT: flow matching on implicit positive / negative policies, weighted by an optimality r",
    loss=_loss,
    needs_reference=True,
    noise="image",
    data=("rollouts",),
    needs_t=True,
    options=OPTIONS,
    predictions=True,
    initial=lambda p: p["kl_weight"] > 0,
    timesteps=grid_share,
    samples_with="reference",
)
