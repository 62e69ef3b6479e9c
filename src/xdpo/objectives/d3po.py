"""D3PO (Yang et al., CVPR 2024, arXiv 2311.13231): DPO on pairs of denoising trajectories of one prompt,
every sampler step an action, without a reward model in the loss (docs/math.md §12.4).

For a group (the K images of one prompt, `noise="group"`) at a recorded sampler step t, the preferred
trajectory w and the dispreferred l are its best and worst images by the scorer's score (a person's labels
through a `module:function` reward), and with the per-step log-probabilities of the policy and the
reference (the pre-trained model: `reference.strategy=frozen`, a frozen copy in the authors' code):

    rho = clip(exp(log p_theta(x'_t | x_t) - log p_ref(x'_t | x_t)), 1 - eps, 1 + eps)      (the code's
    L = -log sigmoid(beta log rho_w - beta log rho_l)                                 clipped "Q value")

(Eq. 13 of the paper with the code's clip). Groups whose best and worst score alike contribute log 2 and
no gradient (the code's `compare` gives [0, 0]). Every image of a group carries the group's loss, so the
mean over images is the mean over groups. Defaults: the code's beta = 0.1, eps = 0.1, DDIM eta = 1,
timestep_fraction 1 (config/base.py); per_prompt = 2 is the paper's pair. As in the code, a group's
trajectories start from the same initial noise (`Likelihood.shared_start`) and part by the sampler's noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xdpo.config.options import Option
from xdpo.objectives.likelihood import Likelihood, likelihood_output, noise_of, sampler_options, window_steps
from xdpo.objectives.output import LossOutput
from xdpo.objectives.record import LossInput, Objective


def best_and_worst(score: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per group (0..G-1): the row of its highest and of its lowest score (first on ties)."""
    g = group.long()
    n = int(g.max()) + 1
    rows = torch.arange(score.shape[0], device=score.device)
    best = torch.empty(n, dtype=torch.long, device=score.device)
    worst = torch.empty_like(best)
    for k in range(n):
        mine = rows[g == k]
        s = score[mine]
        best[k], worst[k] = mine[int(torch.argmax(s))], mine[int(torch.argmin(s))]
    return best, worst


def d3po_loss(
    log_prob: Tensor,
    ref_log_prob: Tensor,
    score: Tensor,
    group: Tensor,
    *,
    beta: float = 0.1,
    eps: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row loss [N] (each row its group's), beta log rho_w [G], beta log rho_l [G])."""
    g = group.to(log_prob.device).long()
    s = score.to(log_prob.device).double()
    w, lo = best_and_worst(s, g)
    log_rho = torch.log(
        torch.exp(log_prob.float() - ref_log_prob.to(log_prob.device).float()).clamp(1 - eps, 1 + eps)
    )
    prefer = (s[w] > s[lo]).float()  # 0: the group's images score alike
    rw, rl = beta * log_rho[w] * prefer, beta * log_rho[lo] * prefer
    per_group = -F.logsigmoid(rw - rl)
    return per_group[g], rw.detach(), rl.detach()


def _loss(inp: LossInput, *, beta: float, eps: float, **_: float) -> LossOutput:
    loss, rw, rl = d3po_loss(inp.log_prob, inp.ref_log_prob, inp.advantage, inp.group, beta=beta, eps=eps)
    out = likelihood_output(loss, inp, {})
    out.reward_w, out.reward_l = (
        rw[inp.group.long()],
        rl[inp.group.long()],
    )  # DPO's implicit rewards, per image
    return out


OPTIONS = (
    Option("beta", float, 0.1, "beta of the DPO term on per-step log-ratios (the code's train.beta 0.1)",
           check=lambda v: v > 0, rule="must be > 0"),
    Option("eps", float, 0.1, "the ratio to the reference clipped to [1 - eps, 1 + eps] (the code's train.eps)",
           check=lambda v: 0 < v < 1, rule="must be in (0, 1)"),
    *sampler_options(0.7, 1.0, 1.0),
)  # fmt: skip

D3PO = Objective(
    name="d3po",
    about="D3PO: DPO on the per-step likelihoods of the best and worst trajectories of each prompt",
    loss=_loss,
    needs_reference=True,
    noise="group",
    data=("rollouts",),
    options=OPTIONS,
    likelihood=Likelihood(steps=window_steps, noise=noise_of, reference=lambda p: True, shared_start=True),
    scale=lambda cfg: ("d3po.beta", float(cfg.d3po.beta)),
)
