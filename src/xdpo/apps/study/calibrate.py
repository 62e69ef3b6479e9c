"""Effective-beta calibration of the xDPO forms whose slope at delta = 0 is not a constant.

Diffusion-DPO's logits are (beta / 2) lambda (-delta_w + delta_l); a transform r = f'(z) with slope
s = dr / d(-delta) at delta = 0 starts as Diffusion-DPO at beta x s (docs/math.md §2). The Appendix C form
has s = eta + gamma n (1.05 with the paper's constants, 1 + eta whenever gamma = 1 / n, as in the paper's
Table 3), so matching is a division. Two forms need the model's errors:
- Eq. 10 (`xdpo_eq10`): s = eta + gamma n exp(n e_ref), the mean over the base model's errors e_ref on the
  training pairs' preferred images at uniform (t, eps) draws (the reference's probe, `Probe.errors`);
- the summed error (`loss.error_reduction=sum`): delta is the per-element delta x the number of elements D
  of a sample, so Diffusion-DPO's beta / D is the mean-reduced beta; D is read from the same probe.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

TABLE3 = ((1.0, 1.0), (1.0, 3.0), (1.0, 6.0), (0.5, 6.0), (0.1, 6.0), (0.05, 6.0))  # (eta, n), gamma = 1 / n


def appendix_c_slope(eta: float, n: float, gamma: float | None = None) -> float:
    """eta + gamma n: the Appendix C form's slope at delta = 0 (gamma defaults to the paper's 1 / n)."""
    return eta + (1.0 / n if gamma is None else gamma) * n


def eq10_slope(
    errors: Any, eta: float = 0.05, n: float = 6.0, gamma: float = 1 / 6, clamp: float = 50.0
) -> float:
    """mean of eta + gamma n exp(n e_ref) over per-sample reference errors (the exponent clamped as in
    `xdpo.objectives.divergences`)."""
    return float(sum(eta + gamma * n * math.exp(min(n * float(e), clamp)) for e in errors) / len(errors))


def measure(config: Path, overrides: list[str], draws: int = 8, probe_size: int = 64) -> dict[str, float]:
    """The base model's probe errors for a study job's config: {'eq10_slope', 'elements', 'e_ref_mean'}.
    Builds the run as training would (the same data, family, encode path), draws `draws` (t, eps) per
    probe image and evaluates the initial model only; nothing is trained or kept."""
    import torch

    from xdpo.config import load_config
    from xdpo.train.recipe import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            config,
            [*overrides, f"output_dir={tmp}", "reference.strategy=stable", f"reference.probe_size={probe_size}",
             "train.max_steps=1"],
        )  # fmt: skip
        recipe = Recipe(cfg)
        recipe.setup()
        ref = recipe.models.reference
        errors = ref.probe.errors(ref.initial_predict, seed=cfg.seed, draws=draws, chunk=16)
        elements = int(torch.tensor(ref.probe.latents.shape[1:]).prod())
        recipe.acc.end_training()
    e = errors.double().tolist()
    return {"eq10_slope": eq10_slope(e), "elements": elements, "e_ref_mean": sum(e) / len(e)}
