"""Outer losses and objectives: pure functions of per-sample errors (no models).

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
logits toward 0 instead of training the tie as a win). `sft` and `kto` ignore `label`.

The reported rewards are scaled like the logits, reward_w = (beta / 2) * lambda * r_w, so that
reward_w - reward_l = logits (the Diffusion-DPO convention: the loss looks flat near log 2 while the
reward margin and implicit accuracy show progress).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xdpo.objectives.divergences import DIVERGENCES


@dataclass
class LossOutput:
    """Per-sample loss and the quantities every objective logs (tensors: no device sync until read)."""

    loss: Tensor  # [B] per-sample loss (float32)
    reward_w: Tensor  # [B] (beta/2) * lambda * f'(z_w), detached
    reward_l: Tensor  # [B]
    clamped: Tensor  # [2B] bool: exponent argument clamped (w then l)
    delta_w: Tensor  # [B] e_theta(w) - e_ref(w), detached
    delta_l: Tensor  # [B]

    @property
    def reward_margin(self) -> Tensor:
        return self.reward_w - self.reward_l

    @property
    def implicit_acc(self) -> float:
        """Fraction of pairs with reward_w > reward_l; ties count 0.5."""
        m = self.reward_margin
        return ((m > 0).float() + 0.5 * (m == 0).float()).mean().item()

    @property
    def clamp_fraction(self) -> float:
        """Fraction of exponent arguments clamped."""
        return self.clamped.float().mean().item()


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
    r, clamped = DIVERGENCES[divergence](-s * delta, **params)
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
    return _record(loss, reward_w, reward_l, torch.cat([c_w, c_l]), d_w, d_l)


def sft_loss(
    e_w: Tensor,
    e_l: Tensor,
    e_ref_w: Tensor,
    e_ref_l: Tensor,
    *,
    beta: float = 5000.0,
    weight: Tensor | None = None,
    label: Tensor | None = None,
    **_: float,
) -> LossOutput:
    """Supervised fine-tuning on the preferred image: loss = lambda(t) * e_theta(w) (plain denoising loss).

    The rewards are the Diffusion-DPO ones, logged only to show how SFT moves the implicit preference.
    `label` is ignored: SFT trains on the first image whatever its preference probability (the config
    refuses `data.ties=keep` with SFT).
    """
    dtype = torch.promote_types(e_w.dtype, torch.float32)
    lam = torch.ones_like(e_w, dtype=dtype) if weight is None else weight.to(dtype)
    d_w = e_w.to(dtype) - e_ref_w.to(dtype)
    d_l = e_l.to(dtype) - e_ref_l.to(dtype)
    none = torch.zeros(2 * e_w.shape[0], dtype=torch.bool, device=e_w.device)
    return _record(lam * e_w.to(dtype), -0.5 * beta * lam * d_w, -0.5 * beta * lam * d_l, none, d_w, d_l)


def kto_loss(
    e_w: Tensor,
    e_l: Tensor,
    e_ref_w: Tensor,
    e_ref_l: Tensor,
    *,
    beta: float = 1000.0,
    weight: Tensor | None = None,
    reference_point: Tensor | None = None,
    label: Tensor | None = None,
    **_: float,
) -> LossOutput:
    """Diffusion-KTO (Li et al., NeurIPS 2024) with the winner desirable and the loser undesirable.

    g = e_ref - e_theta per image (the implicit reward); z0 = max(reference point, 0), detached: the
    training step passes `reference_point` = the mean g over a running window of one optimizer step's
    images of all processes (the current micro-batch's included); default: the mean over this batch; `weight` is lambda per pair [B] or per image [2B] (w then l);
    loss = 1 - sigma(beta * lambda * sign * (g - z0)), sign = +1 (desirable) / -1 (undesirable).
    The per-pair loss is the mean of its two per-image losses (so the batch mean is the per-image mean).
    `label` is ignored: KTO needs each image desirable or undesirable (drop ties with `data.ties=drop`).
    """
    dtype = torch.promote_types(e_w.dtype, torch.float32)
    g_w = e_ref_w.to(dtype) - e_w.to(dtype)
    g_l = e_ref_l.to(dtype) - e_l.to(dtype)
    if reference_point is None:
        reference_point = torch.cat([g_w, g_l]).mean()
    z0 = reference_point.detach().to(dtype).clamp(min=0)
    lam = torch.ones_like(g_w) if weight is None else weight.to(dtype)
    lam_w, lam_l = lam.chunk(2) if lam.shape[0] == 2 * g_w.shape[0] else (lam, lam)  # per image or per pair
    loss = 0.5 * (
        (1 - torch.sigmoid(beta * lam_w * (g_w - z0))) + (1 - torch.sigmoid(-beta * lam_l * (g_l - z0)))
    )
    none = torch.zeros(2 * e_w.shape[0], dtype=torch.bool, device=e_w.device)
    return _record(loss, beta * lam_w * g_w, beta * lam_l * g_l, none, -g_w, -g_l)


def _record(
    loss: Tensor, reward_w: Tensor, reward_l: Tensor, clamped: Tensor, d_w: Tensor, d_l: Tensor
) -> LossOutput:
    return LossOutput(
        loss=loss,
        reward_w=reward_w.detach(),
        reward_l=reward_l.detach(),
        clamped=clamped,
        delta_w=d_w.detach(),
        delta_l=d_l.detach(),
    )


def kto_images_loss(
    e: Tensor,
    e_ref: Tensor,
    desirable: Tensor,
    *,
    beta: float = 1000.0,
    weight: Tensor | None = None,
    reference_point: Tensor | None = None,
    **_: float,
) -> LossOutput:
    """Diffusion-KTO on independent images (Li et al. 2024; data in its per-image format).

    g = e_ref - e_theta, z0 = max(reference point, 0) (detached), sign = +1 desirable / -1 undesirable,
    loss = 1 - sigma(beta * lambda * sign * (g - z0)). Logged as pairs of (image, nothing):
    reward_w = beta * lambda * sign * (g - z0), reward_l = 0, so `implicit_acc` is the fraction of images
    on the right side of the reference point.
    """
    dtype = torch.promote_types(e.dtype, torch.float32)
    g = e_ref.to(dtype) - e.to(dtype)
    if reference_point is None:
        reference_point = g.mean()
    z0 = reference_point.detach().to(dtype).clamp(min=0)
    lam = torch.ones_like(g) if weight is None else weight.to(dtype)
    sign = desirable.to(device=g.device, dtype=dtype) * 2 - 1
    x = beta * lam * sign * (g - z0)
    none = torch.zeros(2 * e.shape[0], dtype=torch.bool, device=e.device)
    return _record(1 - torch.sigmoid(x), x, torch.zeros_like(x), none, -g, torch.zeros_like(g))


OBJECTIVES: dict[str, Callable[..., LossOutput]] = {"pair": preference_loss, "sft": sft_loss, "kto": kto_loss}


def objective_loss(
    objective: str, e_w: Tensor, e_l: Tensor, e_ref_w: Tensor, e_ref_l: Tensor, **kw
) -> LossOutput:
    """Dispatch by `loss.objective` name; keyword arguments are the `loss.*` config values.

    Pass `label=batch["label_w"]` for soft preference targets (ties); `sft` and `kto` ignore it.
    """
    return OBJECTIVES[objective](e_w, e_l, e_ref_w, e_ref_l, **kw)
