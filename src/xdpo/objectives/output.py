"""What every objective returns: per-row losses and the quantities the run logs (`LossOutput`).

A row is a pair (w, l) for pair objectives and an image for per-image ones (Diffusion-KTO on its own
data). The reported rewards are scaled like the logits, reward_w - reward_l = logits (the
Diffusion-DPO convention: the loss looks flat near log 2 while the reward margin and the implicit
accuracy show progress).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class LossOutput:
    """Per-row loss and the quantities every objective logs (tensors: no device sync until read)."""

    loss: Tensor  # [R] per-row loss (float32)
    reward_w: Tensor  # [R] (beta/2) * lambda * f'(z_w), detached
    reward_l: Tensor  # [R]
    clamped: Tensor  # [2R] bool: exponent argument clamped (w then l)
    delta_w: Tensor  # [R] e_theta(w) - e_ref(w), detached
    delta_l: Tensor  # [R]
    extra: dict[str, Tensor] = field(default_factory=dict)  # more per-row quantities, logged as their means
    counts: dict[str, Tensor] | None = None  # per-row 0/1 flags an objective counts (logged as step totals)

    @property
    def reward_margin(self) -> Tensor:
        return self.reward_w - self.reward_l

    @property
    def implicit_acc(self) -> float:
        """Fraction of rows with reward_w > reward_l; ties count 0.5."""
        m = self.reward_margin
        return ((m > 0).float() + 0.5 * (m == 0).float()).mean().item()

    @property
    def clamp_fraction(self) -> float:
        """Fraction of exponent arguments clamped."""
        return self.clamped.float().mean().item()


def loss_output(
    loss: Tensor, reward_w: Tensor, reward_l: Tensor, clamped: Tensor, d_w: Tensor, d_l: Tensor
) -> LossOutput:
    """A `LossOutput` with the logged quantities detached."""
    return LossOutput(
        loss=loss,
        reward_w=reward_w.detach(),
        reward_l=reward_l.detach(),
        clamped=clamped,
        delta_w=d_w.detach(),
        delta_l=d_l.detach(),
    )


def no_clamps(rows: int, device: torch.device) -> Tensor:
    """The `clamped` mask of an objective without clamped exponents: [2R] all False."""
    return torch.zeros(2 * rows, dtype=torch.bool, device=device)


def rollout_output(loss: Tensor, inp: Any) -> LossOutput:
    """A rollout objective's logged quantities, rows = images: reward_w = A (e_ref - e_theta) (the policy's
    improvement on the reference, signed by the advantage), reward_l = 0, so `implicit_acc` is the share of
    images the policy moved the advantage's way; delta = e_theta - e_ref."""
    ref = inp.err.detach() if inp.ref is None else inp.ref
    delta = inp.err.float() - ref.float()
    a = inp.advantage.to(delta.device).float()
    zero = torch.zeros_like(delta)
    return loss_output(loss, -a * delta, zero, no_clamps(delta.shape[0], delta.device), delta, zero)


def mean_square(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """mean over all but the first dim of (a - b)^2 in `dtype`; b detached (a reference's prediction or a target)."""
    d = a.to(dtype) - b.detach().to(a.device, dtype)
    return d.pow(2).mean(dim=list(range(1, d.ndim)))
