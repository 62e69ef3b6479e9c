"""Diffusion-KTO (Li et al., NeurIPS 2024): each image desirable or undesirable against a reference point.

g = e_ref - e_theta per image (the implicit reward); z0 = max(mean g over a window, 0), detached;
loss = 1 - sigma(beta * lambda * sign * (g - z0)), sign = +1 desirable / -1 undesirable. On pair data
the winner is desirable and the loser undesirable; on per-image data (`data.format=images`) each row
carries its own flag. Each image draws its own (t, eps) (`noise="image"`), as Diffusion-KTO trains.
The paper takes z0 over the batch; here the window is the last optimizer step's images of all
processes (`ReferencePoint`), so it never degenerates to the two images of one pair (docs/math.md §5).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from xdpo.objectives.output import LossOutput, loss_output, no_clamps
from xdpo.objectives.record import LossInput, Objective


class ReferencePoint:
    """z0's window: the implicit rewards g of the last `size` images of all processes (one optimizer
    step's worth); its contents are saved with checkpoints (exact resume)."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=max(size, 1))

    def update(self, g: Tensor) -> Tensor:
        self.values.extend(g.detach().float().flatten().tolist())
        return torch.tensor(sum(self.values) / len(self.values), device=g.device)

    def state(self) -> list[float]:
        return list(self.values)

    def load(self, values: list[float]) -> None:
        self.values.clear()
        self.values.extend(values)


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
    """Diffusion-KTO on pairs, the winner desirable and the loser undesirable.

    `reference_point`: the mean g over the window (default: this batch's images); `weight` is lambda per
    pair [B] or per image [2B] (w then l). The per-pair loss is the mean of its two per-image losses (so
    the batch mean is the per-image mean). `label` is ignored (drop ties with `data.ties=drop`).
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
    none = no_clamps(e_w.shape[0], e_w.device)
    return loss_output(loss, beta * lam_w * g_w, beta * lam_l * g_l, none, -g_w, -g_l)


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
    """Diffusion-KTO on independent images (its per-image data format).

    Logged as rows of (image, nothing): reward_w = beta * lambda * sign * (g - z0), reward_l = 0, so
    `implicit_acc` is the fraction of images on the right side of the reference point.
    """
    dtype = torch.promote_types(e.dtype, torch.float32)
    g = e_ref.to(dtype) - e.to(dtype)
    if reference_point is None:
        reference_point = g.mean()
    z0 = reference_point.detach().to(dtype).clamp(min=0)
    lam = torch.ones_like(g) if weight is None else weight.to(dtype)
    sign = desirable.to(device=g.device, dtype=dtype) * 2 - 1
    x = beta * lam * sign * (g - z0)
    none = no_clamps(e.shape[0], e.device)
    return loss_output(1 - torch.sigmoid(x), x, torch.zeros_like(x), none, -g, torch.zeros_like(g))


def _loss(inp: LossInput, *, beta: float) -> LossOutput:
    z0 = inp.state.update(inp.gather((inp.ref - inp.err).detach()))
    if not inp.pairs:
        return kto_images_loss(inp.err, inp.ref, inp.label, beta=beta, weight=inp.weight, reference_point=z0)
    b = inp.rows
    return kto_loss(
        inp.err[:b], inp.err[b:], inp.ref[:b], inp.ref[b:], beta=beta, weight=inp.weight, reference_point=z0
    )


KTO = Objective(
    name="kto",
    about="Diffusion-KTO: each image desirable (winner) or undesirable (loser) against a reference point",
    loss=_loss,
    params=("beta",),
    noise="image",
    data=("pairs", "images"),
    state=ReferencePoint,
)
