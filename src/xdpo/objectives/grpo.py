"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) with MixGRPO's sliding window (Li et al. 2025, arXiv
2507.21802): PPO-clip on the per-step likelihood ratios of a stochastic sampler (docs/math.md §12.2).

For a row (image i, recorded sampler step t) with group advantage A_i (`xdpo.rollout.advantages`, reused as
they are; clipped to [-c, c] as the authors' `adv_clip_max`), the log-probability of the recorded step
under the current weights log p_theta and the one recorded when sampling log p_old:

    r = exp(log p_theta - log p_old)
    L = max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta KL(p_theta(. | x_t) || p_ref(. | x_t))     (Eq. 7)

with the per-step Gaussian KL ||mu_theta - mu_ref||^2 / (2 std^2), averaged over the latent's dimensions
(the paper's closed form; the authors' code divides by the SDE's s^2 rather than the step's variance
s^2 |dt|, i.e. its KL is |dt| times this one). The reference is the run's (`reference.strategy=frozen`: the
base model, as the paper's). The first update of every round is on-policy: r = 1 exactly up to numerics,
which the run logs (`ratio_at_start`, docs/math.md §12.2). Sampler: Flow-GRPO's SDE (flow) or DDIM with
eta (DDPM), every step stochastic, or MixGRPO's window (`xdpo.objectives.likelihood`).
Defaults: the paper's and its repository's (config/grpo.py): eps = 1e-4, c = 5, beta = 0.04 (GenEval and
OCR; 0.01 PickScore), noise level 0.7, timestep_fraction 0.99; MixGRPO's w = 4, one step every 25 rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.likelihood import (
    KL_TO_REFERENCE,
    gaussian_kl,
    likelihood_output,
    sampler_options,
)
from xdpo.objectives.output import LossOutput
from xdpo.objectives.record import LossInput, Objective


def ppo_clip(log_prob: Tensor, old_log_prob: Tensor, advantage: Tensor, clip_range: float) -> Tensor:
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) per row, r = exp(log_prob - old_log_prob)."""
    ratio = torch.exp(log_prob.float() - old_log_prob.to(log_prob.device).float())
    a = advantage.to(ratio.device).float()
    return torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))


def grpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantage: Tensor, *, clip_range: float = 1e-4, adv_clip: float = 5.0,
    kl_weight: float = 0.04, step_mean: Tensor | None = None, ref_step_mean: Tensor | None = None,
    step_std: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(per-row loss [N], per-row KL or None) of the module docstring."""
    a = advantage.to(log_prob.device).float().clamp(-adv_clip, adv_clip)
    loss = ppo_clip(log_prob, old_log_prob, a, clip_range)
    kl = None
    if kl_weight > 0:
        kl = gaussian_kl(step_mean, ref_step_mean, step_std)
        loss = loss + kl_weight * kl
    return loss, kl


def _loss(inp: LossInput, *, clip_range: float, adv_clip: float, kl_weight: float, **_: float) -> LossOutput:
    loss, kl = grpo_loss(
        inp.log_prob, inp.old_log_prob, inp.advantage, clip_range=clip_range, adv_clip=adv_clip,
        kl_weight=kl_weight, step_mean=inp.step_mean, ref_step_mean=inp.ref_step_mean, step_std=inp.step_std,
    )  # fmt: skip
    ratio = torch.exp(inp.log_prob.detach().float() - inp.old_log_prob.to(loss.device).float())
    clipped = ((ratio - 1).abs() > clip_range).float()
    return likelihood_output(
        loss, inp, {"clip_fraction": clipped, **({} if kl is None else {"kl": kl.detach()})}
    )


OPTIONS = (
    Option("clip_range", float, 1e-4, "PPO's eps: ratios clipped to [1 - eps, 1 + eps] (Flow-GRPO's 1e-4)",
           check=lambda v: v > 0, rule="must be > 0"),
    Option("adv_clip", float, 5.0, "advantages clipped to [-c, c] (Flow-GRPO's adv_clip_max 5)",
           check=lambda v: v > 0, rule="must be > 0"),
    Option("kl_weight", float, 0.04, "beta: weight of the per-step KL to the reference (Flow-GRPO: 0.04 GenEval "
           "and OCR, 0.01 PickScore; 0 = no reference forward)", check=lambda v: v >= 0, rule="must be >= 0"),
    *sampler_options(0.7, 1.0, 0.99),
    Option("window", int, 0, "MixGRPO: SDE (and training) only on this many sampler steps, ODE elsewhere; 0 = "
           "every step (Flow-GRPO); MixGRPO uses 4", check=lambda v: v >= 0, rule="must be >= 0"),
    Option("window_every", int, 25, "move the window every k rounds (MixGRPO's shift interval tau = 25); 0 = "
           "never: the window stays at the start (Flow-GRPO-Fast)", check=lambda v: v >= 0, rule="must be >= 0"),
    Option("window_stride", int, 1, "steps the window moves each time (MixGRPO's stride 1)",
           check=lambda v: v >= 1, rule="must be >= 1"),
)  # fmt: skip

GRPO = Objective(
    name="grpo",
    about="Flow-GRPO: PPO-clip on per-step likelihood ratios of an SDE sampler, group advantages, KL to the "
    "reference; MixGRPO's sliding window",
    loss=_loss,
    needs_reference=True,
    noise="image",
    data=("rollouts",),
    options=OPTIONS,
    scale=None,
    likelihood=KL_TO_REFERENCE,
)
