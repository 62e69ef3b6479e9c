"""SFT, the supervised baseline of Diffusion-DPO and xDPO: the plain denoising loss on the preferred image."""

from __future__ import annotations

import torch
from torch import Tensor

from xdpo.objectives.output import LossOutput, loss_output, no_clamps
from xdpo.objectives.record import LossInput, Objective


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

    The rewards are the Diffusion-DPO ones, logged only to show how SFT moves the implicit preference
    (0 when the reference errors are the policy's own, as in training: SFT runs no reference).
    `label` is ignored: SFT trains on the first image whatever its preference probability.
    """
    dtype = torch.promote_types(e_w.dtype, torch.float32)
    lam = torch.ones_like(e_w, dtype=dtype) if weight is None else weight.to(dtype)
    d_w = e_w.to(dtype) - e_ref_w.to(dtype)
    d_l = e_l.to(dtype) - e_ref_l.to(dtype)
    none = no_clamps(e_w.shape[0], e_w.device)
    return loss_output(lam * e_w.to(dtype), -0.5 * beta * lam * d_w, -0.5 * beta * lam * d_l, none, d_w, d_l)


def _loss(inp: LossInput, *, beta: float) -> LossOutput:
    b = inp.rows
    ref = inp.err.detach() if inp.ref is None else inp.ref  # no reference: delta = 0, logged rewards 0
    return sft_loss(inp.err[:b], inp.err[b:], ref[:b], ref[b:], beta=beta, weight=inp.weight)


SFT = Objective(
    name="sft",
    about="denoising loss on the preferred image (the SFT baseline; no reference)",
    loss=_loss,
    params=("beta",),
    needs_reference=False,
    scale=None,  # its loss has no beta (loss.beta scales only the logged rewards)
)
