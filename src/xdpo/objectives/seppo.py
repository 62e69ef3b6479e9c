"""SePPO, Semi-Policy Preference Optimization (Zhang et al. 2024, arXiv 2410.05255v1; docs/math.md §13).

Only the preferred image x^w of each caption comes from the data; the losing image is a reference sample
x^ref that the reference model (a previous checkpoint of the policy, `xdpo.train.reference.checkpoints`)
generates for the caption at the step (`losers="reference"`: `xdpo.rollout.reference_samples`). With the
errors e = ||eps - eps_model(x_t, t)||^2 of the policy (theta) and the reference (ref) at one shared
(t, eps) per pair, and Delta(x) = e_theta(x) - e_ref(x):

    s      = sign(e_ref(w) - e_theta(w))                                   (the anchor criterion, Eq. 8)
    h      = -lambda(t) * (Delta(w) - s * Delta(x^ref))
    loss   = -log sigma((beta / 2) * h)                                    (Eq. 7, xdpo's beta / 2 scale)

The anchor-based adaptive flipper (AAF) reads the winner as an anchor: where the reference model
denoises the anchor better than the policy (s = -1), the reference sample is likely the better image and
the loss learns from it as a second winner (both Delta terms pushed down); where the policy is better
(s = +1), the reference sample is a loser, as in Diffusion-DPO. `seppo.flipper=indicator` is the paper's
ablation s = 1(e_ref(w) - e_theta(w) > 0): s = 0 skips the reference sample (only the winner's term is
left). s is piecewise constant (no gradient); a tie (s = 0 under `sign`) skips it too.
The outer losses of `loss.outer` apply to the logits as for the pair objective (sigmoid is the paper's).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from xdpo.config.options import Option
from xdpo.errors import ConfigError
from xdpo.objectives.output import LossOutput, loss_output, no_clamps
from xdpo.objectives.preference import check_outer, soft_outer
from xdpo.objectives.record import LossInput, Objective

FLIPPERS = ("sign", "indicator")


def aaf_flip(e_w: Tensor, e_ref_w: Tensor, flipper: str = "sign") -> Tensor:
    """s per pair from the errors on the anchor (the winner): sign(x) or 1(x > 0), x = e_ref(w) - e_theta(w)."""
    if flipper not in FLIPPERS:
        raise ValueError(f"unknown flipper {flipper!r}; choose from {', '.join(FLIPPERS)}")
    x = e_ref_w.detach() - e_w.detach()
    return torch.sign(x) if flipper == "sign" else (x > 0).float()


def seppo_loss(
    e_w: Tensor,
    e_l: Tensor,
    e_ref_w: Tensor,
    e_ref_l: Tensor,
    *,
    beta: float = 5000.0,
    flipper: str = "sign",
    outer: str = "sigmoid",
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> tuple[LossOutput, Tensor]:
    """Per-pair SePPO loss (module docstring) and the flip s [B]. Logged rewards: reward_w = -(beta/2) lambda
    Delta(w), reward_l = -(beta/2) lambda s Delta(x^ref), so reward_w - reward_l are the logits."""
    dtype = torch.promote_types(e_w.dtype, torch.float32)
    d_w = e_w.to(dtype) - e_ref_w.to(dtype)
    d_l = e_l.to(dtype) - e_ref_l.to(dtype)
    s = aaf_flip(e_w, e_ref_w, flipper).to(dtype)
    lam = torch.ones_like(d_w) if weight is None else weight.to(dtype)
    h = -lam * (d_w - s * d_l)
    logits = 0.5 * beta * h
    loss = soft_outer(outer, logits, h, beta, label_smoothing, None)
    out = loss_output(loss, -0.5 * beta * lam * d_w, -0.5 * beta * lam * s * d_l,
                      no_clamps(d_w.shape[0], d_w.device), d_w, d_l)  # fmt: skip
    return out, s


def _loss(
    inp: LossInput, *, beta: float, outer: str, label_smoothing: float, flipper: str, **_: object
) -> LossOutput:
    b = inp.rows
    out, s = seppo_loss(
        inp.err[:b], inp.err[b:], inp.ref[:b], inp.ref[b:], beta=beta, flipper=flipper, outer=outer,
        label_smoothing=label_smoothing, weight=inp.weight,
    )  # fmt: skip
    out.counts = {
        "aaf_loser": (s > 0).float(),
        "aaf_winner": (s < 0).float(),
        "aaf_skipped": (s == 0).float(),
    }
    return out


def require(ok: bool, key: str, what: str, value: Any) -> None:
    """One line naming `key` (the config's own form: "config key `key`: what, got value")."""
    if not ok:
        raise ConfigError(f"config key `{key}`: {what}, got {value!r}")


def check(cfg: Any) -> None:
    """SePPO's rules: Diffusion-DPO's reverse-KL log-ratios (the flip acts on them), its reference strategy,
    a dataset of images at one square size (the reference sampler draws data.resolution squares)."""
    check_outer(cfg)
    lo, r, d = cfg.loss, cfg.reference, cfg.data
    require(lo.divergence == "reverse_kl", "loss.divergence", "seppo flips the reference sample's log-ratio "
            "term of Diffusion-DPO (the paper's Eq. 7), defined for reverse_kl only", lo.divergence)  # fmt: skip
    require(r.strategy == "checkpoints", "reference.strategy", "seppo's reference is a previous checkpoint of "
            "the policy: set reference.strategy=checkpoints (seppo.select picks it)", r.strategy)  # fmt: skip
    require(not cfg.online.enabled, "online.enabled", "seppo samples its own losers from the reference each "
            "step; it trains on a dataset's preferred images, not online rounds", True)  # fmt: skip
    require(not d.buckets, "data.buckets", "seppo samples its reference images as data.resolution squares; "
            "train without buckets", d.buckets)  # fmt: skip
    require(d.num_frames == 0, "data.num_frames", "seppo's reference sampler draws images (the rollout "
            "engine); video families are not supported", d.num_frames)  # fmt: skip
    require(not d.cache, "data.cache", "seppo encodes its captions for the reference sampler each step; "
            "train from data.path without a latent cache", d.cache)  # fmt: skip


def _positive(v: int) -> bool:
    return v >= 1


OPTIONS = (
    Option("flipper", Literal["sign", "indicator"], "sign", "the anchor criterion: sign (Eq. 8: a reference "
           "sample is a loser, a winner or, on a tie, skipped) or indicator (the paper's ablation: a loser or "
           "skipped)"),
    Option("select", Literal["random", "latest", "initial"], "random", "which candidate checkpoint becomes the "
           "reference: random (the paper's choice, uniform over the initial model and the saved checkpoints), "
           "latest, or initial"),
    Option("save_every", int, 30, "optimizer steps between two policy checkpoints added to the candidates "
           "(the paper: every 30 updates)", check=_positive, rule="must be >= 1"),
    Option("keep", int, 7, "candidate checkpoints kept besides the initial model, oldest dropped first (the "
           "paper: K = 7)", check=_positive, rule="must be >= 1"),
    Option("resample_every", int, 1, "optimizer steps between two draws of the reference among the "
           "candidates (1: every step)", check=_positive, rule="must be >= 1"),
    Option("steps", int, 0, "denoising steps of the reference sampler (0: the family's default)",
           check=lambda v: v >= 0, rule="must be >= 0"),
    Option("guidance", float, -1.0, "classifier-free guidance of the reference sampler (< 0: the family's "
           "default; <= 1: none)"),
    Option("scheduler", str, "default", "the reference sampler's scheduler (an `xdpo sample --scheduler` "
           "name; default: the pipeline's own)"),
    Option("batch_images", int, 16, "images per pipeline call of the reference sampler",
           check=_positive, rule="must be >= 1"),
)  # fmt: skip


SEPPO = Objective(
    name="seppo",
    about="SePPO (Zhang et al. 2024): preferred images vs samples of a previous checkpoint, with the "
    "anchor-based flipper",
    loss=_loss,
    params=("beta", "outer", "label_smoothing"),
    data=("pairs", "images"),
    check=check,
    options=OPTIONS,
    losers="reference",
)
