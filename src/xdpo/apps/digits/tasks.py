"""The digits world's preference tasks: what the hidden annotator prefers, and how noisily it says so.

- `bold` (the first task, `labeller.hidden_reward`): legible and bolder than a typical real digit, its
  style term clipped at +-3 real-digit standard deviations; Bradley-Terry labels at temperature 0.5 with 5%
  flips. Diffusion-DPO reaches ~2.7 of a ceiling near 3 within 200 steps: it saturates.
- `slant` (the second task): legible and leaning to the right, by more than a real digit of its class does:

      R_slant(x, y) = max(log p_clf(y | x), LOGP_FLOOR)
                      + W_SLANT * clip((s(x) - SLANT_MEAN[y]) / SLANT_STD, -SLANT_CLIP, SLANT_CLIP)

  with s(x) = -mu11 / mu02 the shear of the ink's second moments (x to the right, y down: a digit whose
  top leans right has s > 0), SLANT_MEAN[y] the mean over the 1,797 real digits of class y and SLANT_STD
  the pooled within-class standard deviation. The clip is wide (6 standard deviations: far beyond what the
  base draws), so the reward keeps rising while the model learns to lean, and a shear large enough to make
  the digit unreadable is paid for by the legibility term. Measured: Diffusion-DPO at the study's UNet point
  (beta 30, lr 3e-5, 1,000 pairs, 200 steps of 16) raises it from 0.10 to 0.27, 0.43, 0.54, 0.64, 0.68 at
  steps 40-200 (40 held-out samples, alignment 1.00): still rising at the end, far from the clip. It is labelled with more noise: Bradley-Terry at
  temperature 0.5 with 10% flips, which agrees with the true order on ~73% of the UNet base's non-tied
  pairs and ~71% of the flow base's (expected values over 1,000 pairs of each; `bold`'s labeller gives ~79%
  and ~78% there). Every pairs file records the agreement it drew (`agreement_with_true_reward` in its
  sidecar). This is the xDPO paper's setting of inaccurate reward signals.

A task is chosen by name (`TASKS`) where pairs are made (`xdpo digits make-pairs --task`) and where
models are scored (the scorer `digits-reward` for `bold`, `digits-reward-slant` for `slant`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from xdpo.apps.digits.data import to_grey
from xdpo.apps.digits.labeller import (
    LOGP_FLOOR,
    LabellerSettings,
    _check,
    hidden_reward,
    legibility,
    reward_constants,
)
from xdpo.errors import DataError

W_SLANT = 1.0
SLANT_CLIP = 6.0
# -mu11 / mu02 of the 1,797 real digits at 32x32, per class 0-9, and the pooled within-class std
SLANT_MEAN = (-0.0286, -0.0405, -0.122, -0.0671, 0.0099, -0.0157, -0.1933, 0.1363, -0.0018, -0.0776)
SLANT_STD = 0.0859


def slant(image: Image.Image | np.ndarray) -> float:
    """s = -mu11 / mu02 of the ink 1 - grey/255 (central moments, x right, y down); 0 for a blank image."""
    ink = 1.0 - to_grey(image).astype(np.float64) / 255.0
    mass = ink.sum()
    if mass <= 1e-6:
        return 0.0
    yy, xx = np.mgrid[0 : ink.shape[0], 0 : ink.shape[1]]
    cx, cy = (ink * xx).sum() / mass, (ink * yy).sum() / mass
    mu11 = (ink * (xx - cx) * (yy - cy)).sum() / mass
    mu02 = (ink * (yy - cy) ** 2).sum() / mass
    return 0.0 if mu02 <= 1e-9 else float(-mu11 / mu02)


def slant_score(images: list, digits: np.ndarray) -> np.ndarray:
    """clip((s(x) - SLANT_MEAN[y]) / SLANT_STD, -SLANT_CLIP, SLANT_CLIP) per image."""
    s = np.array([slant(im) for im in images], dtype=np.float64)
    return np.clip((s - np.asarray(SLANT_MEAN)[digits]) / SLANT_STD, -SLANT_CLIP, SLANT_CLIP)


def slant_reward(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """R_slant(image, prompt) of the module docstring, one float per image."""
    digits = _check(images, prompts)
    if not len(images):
        return np.zeros(0)
    return legibility(images, prompts) + W_SLANT * slant_score(images, digits)


def slant_constants() -> dict:
    return {
        "logp_floor": LOGP_FLOOR,
        "w_slant": W_SLANT,
        "slant_clip": SLANT_CLIP,
        "slant_mean": list(SLANT_MEAN),
        "slant_std": SLANT_STD,
    }


@dataclass(frozen=True)
class Task:
    """A preference task: its true reward (images, prompts) -> [N], the annotator's default noise, and the
    reward's constants (recorded next to generated pairs; a change invalidates cached scores)."""

    name: str
    reward: Callable[[list, list[str]], np.ndarray]
    labeller: LabellerSettings
    constants: Callable[[], dict]
    scorer: str  # the evaluation scorer's name

    def describe(self) -> str:
        lab = self.labeller
        return (
            f"{self.name} (labels: Bradley-Terry at temperature {lab.temperature:g}, {lab.noise:.0%} flips)"
        )


TASKS: dict[str, Task] = {
    "bold": Task("bold", hidden_reward, LabellerSettings(), reward_constants, "digits-reward"),
    "slant": Task(
        "slant",
        slant_reward,
        LabellerSettings(temperature=0.5, noise=0.1),
        slant_constants,
        "digits-reward-slant",
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]
