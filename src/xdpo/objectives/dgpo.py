"""DGPO, Direct Group Preference Optimization (Luo et al., ICLR 2026, arXiv 2510.08425): Diffusion-DPO between
the positive and the negative half of a group (docs/math.md §11.4).

With A_i the group advantages (G+ = {A > 0}, G- = the rest, weights |A_i|; sum_{G+} |A| = sum_{G-} |A|
cancels the partition function, Eq. 15) and Delta_i = e_theta,i - e_ref,i at one shared (t, eps) per group:

    paper (Eq. 17, lambda_t T folded into beta):  L_g = -log sigma(-beta sum_i A_i Delta_i)
    code (the published beta = 100 is for it):    S_g = (beta / G) sum_i A_i Delta_i
        L_g = -log sigma(-S_g), trained through the surrogate mean_i sg(sigma(S_g)) A_i e_theta,i

`dgpo.form=code` (default) logs the real -log sigma(-S_g) for every image of group g and backpropagates the
code's surrogate (its gradient: the paper's with beta / G inside and the outer beta / G dropped);
`paper` backpropagates -log sigma(-beta sum A Delta) itself. A is clipped to [-5, 5] (the code's clip,
which rarely acts). The code's PPO-style clip (`dgpo.clip` c): with ratio = exp(e_old - e_theta), a
sample with A > 0 and ratio > 1 + c, or A <= 0 and ratio < 1 - c, passes no gradient (e_theta detached);
e_old is the run's reference (the code's online EMA model theta^-: `reference.strategy=soft`). The DPO
term's reference is the initial model (`dgpo.reference=initial`, the paper's frozen base) or the run's
reference (`reference`: the code's use_ema_ref, which wants beta ~ 2000-5000). KL to the initial model:
+ kl_weight mean (v_theta - v_initial)^2. One (t, eps) per group (`noise="group"`), at `train_timesteps`
distinct steps among the first `max_index + 1` of the rollout sampler's grid (Timestep Clip, Sec. 3.2).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.output import LossOutput, mean_square, rollout_output
from xdpo.objectives.record import LossInput, Objective


def group_sums(x: Tensor, group: Tensor) -> Tensor:
    """sum of x over each image's group, per image [N]."""
    idx = group.to(x.device).long()
    sums = torch.zeros(int(idx.max()) + 1, dtype=x.dtype, device=x.device).index_add(0, idx, x)
    return sums[idx]


def dgpo_loss(
    err: Tensor,
    ref: Tensor,
    advantage: Tensor,
    group: Tensor,
    *,
    beta: float = 100.0,
    form: str = "code",
    adv_clip: float = 5.0,
    clip: float = 0.01,
    old: Tensor | None = None,
    kl_weight: float = 0.0,
    pred: Tensor | None = None,
    init_pred: Tensor | None = None,
) -> Tensor:
    """Per-image loss [N] (module docstring): err e_theta (autograd), ref e_ref, old e_old (for the clip)."""
    dt = torch.promote_types(err.dtype, torch.float32)
    e = err.to(dt)
    a = advantage.to(e.device, dt).clamp(-adv_clip, adv_clip)
    g = group.to(e.device).long()
    size = torch.bincount(g)[g].to(dt)  # G per image
    if clip > 0 and old is not None:
        ratio = torch.exp(old.to(e.device, dt) - e.detach())
        frozen = ((a > 0) & (ratio > 1 + clip)) | ((a <= 0) & (ratio < 1 - clip))
        e = torch.where(frozen, e.detach(), e)
    delta = e - ref.to(e.device, dt).detach()
    scale = beta / size if form == "code" else torch.full_like(size, beta)
    s = group_sums(a * delta, g) * scale
    real = -F.logsigmoid(-s)
    if form == "code":
        surrogate = torch.sigmoid(s.detach()) * a * e
        loss = real.detach() + surrogate - surrogate.detach()
    else:
        loss = real  # every image carries its group's loss: the mean over images is the mean over groups
    if kl_weight > 0:
        loss = loss + kl_weight * mean_square(pred, init_pred, dt)
    return loss


def _loss(inp: LossInput, *, reference: str, train_timesteps: int, max_index: int, **params) -> LossOutput:
    ref = inp.init_err if reference == "initial" else inp.ref
    loss = dgpo_loss(
        inp.err, ref, inp.advantage, inp.group, old=inp.ref, pred=inp.pred, init_pred=inp.init_pred, **params
    )  # fmt: skip
    return rollout_output(loss, inp)


def early_steps(n: int, params: dict, rng: np.random.Generator) -> list[int]:
    """`train_timesteps` distinct positions among the first max_index + 1 of the grid's n steps."""
    top = min(params["max_index"] + 1, n)
    return [int(i) for i in rng.permutation(top)[: min(params["train_timesteps"], top)]]


OPTIONS = (
    Option("beta", float, 100.0, "beta of the group DPO term (App. E, README: 100; 10 reward-hacks; ~2000-5000 "
           "with dgpo.reference=reference)", check=lambda v: v > 0, rule="must be > 0"),
    Option("form", Literal["code", "paper"], "code", "code: S = (beta / G) sum A Delta, trained by the code's "
           "surrogate; paper: -log sigma(-beta sum A Delta) (Eq. 17)"),
    Option("adv_clip", float, 5.0, "advantages clipped to [-c, c] (the code's 5)", check=lambda v: v > 0,
           rule="must be > 0"),
    Option("clip", float, 0.01, "PPO-style clip c of exp(e_reference - e_theta) (the configs' 1e-2; README: "
           "1e-5..1e-4 CFG-free); 0 = off", check=lambda v: v >= 0, rule="must be >= 0"),
    Option("reference", Literal["initial", "reference"], "initial", "the DPO term's reference: the initial "
           "model (paper) or the run's reference (the code's use_ema_ref)"),
    Option("kl_weight", float, 0.02, "weight of mean (v_theta - v_initial)^2 (config/dgpo.py 0.02; README 1e-3)",
           check=lambda v: v >= 0, rule="must be >= 0"),
    Option("train_timesteps", int, 4, "grid steps each group trains at (the code's num_train_timesteps 4)",
           check=lambda v: v >= 1, rule="must be >= 1"),
    Option("max_index", int, 6, "the steps are drawn among grid positions 0..max_index (Timestep Clip; the "
           "code's trunc_steps 6, GenEval 4)", check=lambda v: v >= 0, rule="must be >= 0"),
)  # fmt: skip

DGPO = Objective(
    name="dgpo",
    about="DGPO: Diffusion-DPO between a group's positive and negative halves, weighted by |advantage|",
    loss=_loss,
    needs_reference=True,
    noise="group",
    data=("rollouts",),
    options=OPTIONS,
    predictions=True,
    initial=lambda p: p["kl_weight"] > 0 or p["reference"] == "initial",
    timesteps=early_steps,
)
