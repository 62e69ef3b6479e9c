"""The pairwise preference objective (`pair`: Diffusion-DPO, xDPO and the f-divergence family) and its
outer losses: pure functions of per-sample errors (no models).

Inputs are the per-sample denoising errors of policy and reference on the preferred (w) and
dispreferred (l) images, shape [B], computed with the same (t, eps) for both images of a pair.
With delta = e_theta - e_ref, log z = -s * delta and r = f'(z) (see `divergences.py`):

    h      = lambda(t) * (r_w - r_l)                   (reward difference, before beta)
    logits = (beta / 2) * h                            (docs/math.md §3)

Outer losses over the logits x (docs/math.md §4):
    sigmoid  -(1 - eps) log sigma(x) - eps log sigma(-x)           (DPO; eps > 0 = conservative DPO)
    hinge    relu(1 - x)                                           (SLiC / RSO)
    ipo      (h - 1 / beta)^2                                      (IPO, Azar et al. 2024, tau = beta / 2)
    robust   (-(1 - eps) log sigma(x) + eps log sigma(-x)) / (1 - 2 eps)   (rDPO, Chowdhury et al. 2024)

IPO's regularisation tau plays the role of DPO's beta in logits = tau * h; here the logits are
(beta / 2) * h, so IPO takes tau = beta / 2: (h - 1 / (2 tau))^2 = (h - 1 / beta)^2, optimum at
h* = 1 / beta, i.e. logits x* = 1/2 for every beta. (Earlier versions used (h - 1 / (2 beta))^2,
which at equal beta regularised twice as hard as the other outer losses.)

Soft labels: with `label` p = P(first image preferred) per pair (1 for an ordinary pair, 0.5 for a
tie kept with `data.ties=keep`), loss = p * outer(x) + (1 - p) * outer(-x), with h -> -h for `ipo`:
the expected loss under the label, so a tie is the mean of both orderings (its gradient pulls the
logits toward 0 instead of training the tie as a win).

The reported rewards are scaled like the logits, reward_w = (beta / 2) * lambda * r_w, so that
reward_w - reward_l = logits (the Diffusion-DPO convention: the loss looks flat near log 2 while the
reward margin and implicit accuracy show progress).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from xdpo.objectives.divergences import DIVERGENCES
from xdpo.objectives.output import LossOutput, loss_output
from xdpo.objectives.record import LossInput, Objective


def _sigmoid(x: Tensor, h: Tensor, beta: float, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _hinge(x: Tensor, h: Tensor, beta: float, eps: float) -> Tensor:
    return torch.relu(1 - x)


def _ipo(x: Tensor, h: Tensor, beta: float, eps: float) -> Tensor:
    return (h - 1 / beta) ** 2  # IPO with tau = beta / 2, the scale of the logits (module docstring)


def _robust(x: Tensor, h: Tensor, beta: float, eps: float) -> Tensor:
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


OUTER_LOSSES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
}


UNIT_LABEL_EXACT = frozenset({"sigmoid", "robust", "ipo"})
"""Outer losses for which label 1 and label=None give the same loss, gradients and non-finite values bit for
bit (so a batch without ties can skip the mirrored term). Not `hinge`: at logits +inf its relu(1 - x) is 0
where the label's mirrored term 0 * relu(1 + x) is NaN, and a NaN loss is what skips such a step."""


def soft_outer(outer: str, x: Tensor, h: Tensor, beta: float, eps: float, label: Tensor | None) -> Tensor:
    """label * outer(x, h) + (1 - label) * outer(-x, -h); `label=None` is 1 (the first image preferred)."""
    fn = OUTER_LOSSES[outer]
    loss = fn(x, h, beta, eps)
    if label is None:
        return loss
    p = torch.as_tensor(label, dtype=loss.dtype, device=loss.device)
    return p * loss + (1 - p) * fn(-x, -h, beta, eps)


def _rewards(
    e: Tensor, e_ref: Tensor, divergence: str, s: float, params: dict[str, float]
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = torch.promote_types(torch.promote_types(e.dtype, e_ref.dtype), torch.float32)  # >= float32
    delta = e.to(dtype) - e_ref.to(dtype)
    r, clamped = DIVERGENCES[divergence](-s * delta, e_ref=e_ref.to(dtype), **params)
    return r, clamped, delta


def preference_loss(
    e_w: Tensor,
    e_l: Tensor,
    e_ref_w: Tensor,
    e_ref_l: Tensor,
    *,
    divergence: str = "reverse_kl",
    outer: str = "sigmoid",
    beta: float = 5000.0,
    eta: float = 0.05,
    gamma: float = 1 / 6,
    n: float = 6.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    logratio_scale: float = 1.0,
    clamp: float = 50.0,
    weight: Tensor | None = None,
    label: Tensor | None = None,
) -> LossOutput:
    """Pairwise preference loss: outer((beta/2) * weight * (f'(z_w) - f'(z_l))), in float32 (or float64 inputs).

    `reverse_kl` + `sigmoid` is Diffusion-DPO: -logsigmoid(-0.5 beta ((e_w - e_l) - (e_ref_w - e_ref_l))).
    `weight` is an optional per-sample lambda(t) multiplying beta (Kang et al. 2025).
    `label` [B] is the probability that the first image (w) is preferred (None = 1): the loss is
    label * outer(x) + (1 - label) * outer(-x), so a tie (0.5) averages both orderings.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {sorted(DIVERGENCES)}")
    if outer not in OUTER_LOSSES:
        raise ValueError(f"unknown outer loss {outer!r}; choose from {sorted(OUTER_LOSSES)}")
    params = {"eta": eta, "gamma": gamma, "n": n, "alpha": alpha, "clamp": clamp}
    r_w, c_w, d_w = _rewards(e_w, e_ref_w, divergence, logratio_scale, params)
    r_l, c_l, d_l = _rewards(e_l, e_ref_l, divergence, logratio_scale, params)
    if weight is None:  # lambda = 1: the same values as multiplying by ones, without the ops
        h, reward_w, reward_l = r_w - r_l, 0.5 * beta * r_w, 0.5 * beta * r_l
    else:
        lam = weight.to(r_w.dtype)
        h, reward_w, reward_l = lam * (r_w - r_l), 0.5 * beta * lam * r_w, 0.5 * beta * lam * r_l
    logits = 0.5 * beta * h
    loss = soft_outer(outer, logits, h, beta, label_smoothing, label)
    return loss_output(loss, reward_w, reward_l, torch.cat([c_w, c_l]), d_w, d_l)


PREFERENCE_PARAMS = ("divergence", "outer", "beta", "eta", "gamma", "n", "alpha", "label_smoothing",
                     "logratio_scale", "clamp")  # fmt: skip


def pair_loss(inp: LossInput, **params: object) -> LossOutput:
    """`preference_loss` on a micro-batch's [w; l] errors. A batch of ordinary pairs (all labels 1) passes
    no label to the outer losses that give bit-identical results without one (`UNIT_LABEL_EXACT`); the
    check reads the label where it lives (the CPU for data batches: no device sync)."""
    b = inp.rows
    label = inp.label
    if label is not None and params["outer"] in UNIT_LABEL_EXACT and bool((label == 1).all()):
        label = None
    if label is not None:
        label = label.to(inp.err.device)
    return preference_loss(
        inp.err[:b], inp.err[b:], inp.ref[:b], inp.ref[b:], weight=inp.weight, label=label, **params
    )


def check_outer(cfg: object) -> None:
    """`loss.label_smoothing` acts only in the sigmoid and robust outer losses."""
    from xdpo.errors import ConfigError

    lo = cfg.loss  # type: ignore[attr-defined]
    if lo.label_smoothing != 0 and lo.outer not in ("sigmoid", "robust"):
        raise ConfigError(
            f"config key `loss.label_smoothing`: only applies to loss.outer=sigmoid or robust, got {lo.label_smoothing!r}"
        )


PAIR = Objective(
    name="pair",
    about="preference loss on (w, l): Diffusion-DPO / Flow-DPO, xDPO and the divergences, any outer loss",
    loss=pair_loss,
    params=PREFERENCE_PARAMS,
    uses_labels=True,
    check=check_outer,
)
