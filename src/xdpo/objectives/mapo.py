"""MaPO, Margin-aware Preference Optimization (Hong et al., AAAI-26, arXiv 2406.06424): reference-free.

Per pair (one shared t and eps), with policy errors only (docs/math.md §5b):

    g(x) = x / (exp(x) - 1)                      (g(0) = 1: bounded in (0, 1], decreasing)
    loss = e_theta(w) + lambda * softplus(-kappa * w_t * [g(s e_theta(w)) - g(s e_theta(l))])

The first term is the denoising loss on the preferred image; the margin term raises the loser's error
against the winner's through the bounded link g (the paper's phi_beta, Eq. 11). The paper (Eqs. 9-11)
and the authors' released code differ: the code computes the link with temperature s = `snr_value`
(0.5), weights the margin term by lambda = `beta_mapo` (0.1) and multiplies the link difference by the
scheduler's num_train_timesteps (kappa = 1000) inside the log-sigmoid; the paper has s = beta,
lambda = 1 / beta, kappa = 1 (beta = 8 on Pick-a-Pic for SDXL). xdpo's defaults are the code's, the
form the released checkpoints were trained with; `mapo.link_scale=8 mapo.margin_weight=0.125
mapo.logit_scale=1` is the paper's. w_t = lambda(t) of `timesteps.weighting` (1 by default).
No reference forward runs and no reference copy is made (`needs_reference=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.output import LossOutput, loss_output, no_clamps
from xdpo.objectives.record import LossInput, Objective


def mapo_link(x: Tensor) -> Tensor:
    """g(x) = x / expm1(x), with g(0) = 1 (its limit; the series 1 - x/2 near 0)."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2, safe / torch.expm1(safe))


def mapo_loss(
    e_w: Tensor,
    e_l: Tensor,
    *,
    link_scale: float = 0.5,
    margin_weight: float = 0.1,
    logit_scale: float = 1000.0,
    weight: Tensor | None = None,
) -> LossOutput:
    """Per-pair MaPO loss from the policy's errors on w and l [B] (module docstring). Logged rewards are
    kappa * w_t * g(s e), so reward_w - reward_l is the margin's logit and `implicit_acc` the share of pairs
    whose winner the policy already denoises better in the link's terms."""
    dtype = torch.promote_types(e_w.dtype, torch.float32)
    ew, el = e_w.to(dtype), e_l.to(dtype)
    scale = torch.full_like(ew, logit_scale) if weight is None else logit_scale * weight.to(dtype)
    r_w, r_l = scale * mapo_link(link_scale * ew), scale * mapo_link(link_scale * el)
    loss = ew + margin_weight * F.softplus(-(r_w - r_l))
    zero = torch.zeros_like(ew)
    return loss_output(loss, r_w, r_l, no_clamps(ew.shape[0], ew.device), zero, zero)


def _loss(inp: LossInput, *, link_scale: float, margin_weight: float, logit_scale: float) -> LossOutput:
    b = inp.rows
    return mapo_loss(
        inp.err[:b], inp.err[b:], link_scale=link_scale, margin_weight=margin_weight,
        logit_scale=logit_scale, weight=inp.weight,
    )  # fmt: skip


def _positive(v: float) -> bool:
    return v > 0


OPTIONS = (
    Option("link_scale", float, 0.5, "s: the link's temperature, g(s e) (the code's snr_value 0.5; paper: beta, 8 "
           "for Pick-a-Pic on SDXL)", check=_positive, rule="must be > 0"),
    Option("margin_weight", float, 0.1, "lambda: weight of the margin term (the code's beta_mapo 0.1; paper: "
           "1 / beta)", check=lambda v: v >= 0, rule="must be >= 0"),
    Option("logit_scale", float, 1000.0, "kappa: scale of the link difference in the log-sigmoid (the code's "
           "num_train_timesteps 1000; paper: 1)", check=_positive, rule="must be > 0"),
)  # fmt: skip


def _scale(cfg: object) -> tuple[str, float]:
    """kappa scales the link difference into the log-sigmoid's logits (loss.beta is not read)."""
    return "mapo.logit_scale", float(cfg.mapo.logit_scale)  # type: ignore[attr-defined]


MAPO = Objective(
    name="mapo",
    about="MaPO (Hong et al. 2024): reference-free, denoising loss on w plus a bounded margin over (w, l)",
    loss=_loss,
    needs_reference=False,
    options=OPTIONS,
    scale=_scale,
)
