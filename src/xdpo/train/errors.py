"""Per-sample denoising errors (docs/math.md §1): e = mean_{C,H,W} (prediction - target)^2, float32."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def per_sample_error(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """e = mean (or sum) over all non-batch dims of (pred - target)^2, in float32."""
    sq = (pred.float() - target.float()).pow(2)
    dims = list(range(1, sq.ndim))
    return sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)


def space_error(
    process: Any,
    space: str,
    reduction: str,
    pred: Tensor,
    noisy: Tensor,
    t: Tensor,
    eps: Tensor,
    target: Tensor,
) -> Tensor:
    """Per-sample error in `loss.error_space`: against the native target (eps, v, x0 or flow velocity), or
    re-expressed as a noise prediction against eps (`epsilon`)."""
    if space == "epsilon":
        return per_sample_error(process.to_epsilon(pred, noisy, t), eps, reduction)
    return per_sample_error(pred, target, reduction)
