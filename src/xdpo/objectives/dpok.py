"""DPOK (Fan et al., NeurIPS 2023, arXiv 2305.16381): policy gradient on the per-step likelihood of the
sampler with a KL regulariser to the pre-trained model (docs/math.md §12.3).

The objective (Eq. 9-10 with the KL upper bound of Lemma 4.1) is minimised as, per row (image i, sampler
step t) with advantage A_i, the likelihood ratio r = p_theta / p_old of the recorded step (importance
sampling, clipped as PPO's, Sec. 4.3 / App. B), reward weight alpha and KL weight beta:

    L = alpha max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta KL(p_theta(. | x_t) || p_pre(. | x_t))

KL: the Gaussians' closed form ||mu_theta - mu_pre||^2 / (2 std^2) averaged over the latent's dimensions.
p_pre is the run's reference (`reference.strategy=frozen`: the pre-trained model, as the paper's). The
advantage is the round's group advantage (xdpo's rollout engine), where DPOK learns a value function as its
baseline (our substitution, docs/math.md §12.3). Defaults as DPOK's (alpha = 10, beta = 0.01, eps = 1e-4,
DDIM eta 1); they could not be re-checked against the paper's text in this session (docs/math.md §12.3).
"""

from __future__ import annotations

import torch

from xdpo.config.options import Option
from xdpo.objectives.grpo import ppo_clip
from xdpo.objectives.likelihood import (
    KL_TO_REFERENCE,
    gaussian_kl,
    likelihood_output,
    sampler_options,
)
from xdpo.objectives.output import LossOutput
from xdpo.objectives.record import LossInput, Objective


def dpok_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, *, reward_weight: float = 10.0,
    kl_weight: float = 0.01, clip_range: float = 1e-4, step_mean: torch.Tensor | None = None,
    ref_step_mean: torch.Tensor | None = None, step_std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(per-row loss, per-row KL or None) of the module docstring."""
    loss = reward_weight * ppo_clip(log_prob, old_log_prob, advantage, clip_range)
    kl = None
    if kl_weight > 0:
        kl = gaussian_kl(step_mean, ref_step_mean, step_std)
        loss = loss + kl_weight * kl
    return loss, kl


def _loss(
    inp: LossInput, *, reward_weight: float, kl_weight: float, clip_range: float, **_: float
) -> LossOutput:
    loss, kl = dpok_loss(
        inp.log_prob, inp.old_log_prob, inp.advantage, reward_weight=reward_weight, kl_weight=kl_weight,
        clip_range=clip_range, step_mean=inp.step_mean, ref_step_mean=inp.ref_step_mean, step_std=inp.step_std,
    )  # fmt: skip
    return likelihood_output(loss, inp, {} if kl is None else {"kl": kl.detach()})


OPTIONS = (
    Option("reward_weight", float, 10.0, "alpha: weight of the policy-gradient term (DPOK's 10)",
           check=lambda v: v > 0, rule="must be > 0"),
    Option("kl_weight", float, 0.01, "beta: weight of the per-step KL to the pre-trained model (DPOK's 0.01)",
           check=lambda v: v >= 0, rule="must be >= 0"),
    Option("clip_range", float, 1e-4, "importance ratios clipped to [1 - eps, 1 + eps] (DPOK's 1e-4)",
           check=lambda v: v > 0, rule="must be > 0"),
    *sampler_options(0.7, 1.0, 1.0),
)  # fmt: skip

DPOK = Objective(
    name="dpok",
    about="DPOK: policy gradient on per-step likelihoods with a KL regulariser to the pre-trained model",
    loss=_loss,
    needs_reference=True,
    noise="image",
    data=("rollouts",),
    options=OPTIONS,
    scale=None,
    likelihood=KL_TO_REFERENCE,
)
