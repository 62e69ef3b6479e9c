"""Reward-hacking monitors of a round (logged in its record, `round-NNNN.json`):

- `heldout`: the mean score of the round's images under `online.heldout_scorer`, a reward the run never
  trains on (a falling held-out reward while the trained one rises is the mark of reward hacking);
- `diversity`: the mean over groups of the mean squared pixel distance between two images of a group
  (pixels in [0, 1]; a policy collapsing onto one image per prompt drives it to 0);
- `drift`: the mean squared pixel distance between the sampling model's images at fixed (prompt, seed)
  jobs and round 0's images at the same jobs (round 0 samples the initial model, the reference), with
  `heldout_fixed`, the held-out score of those fixed-seed images (comparable across rounds).
`falling_for(history)` counts the rounds the held-out reward has fallen in a row (`online.stop_on`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np


def pixels(images: Sequence[Any]) -> np.ndarray:
    """[n, H, W, 3] float64 in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])


def group_diversity(px: np.ndarray) -> float:
    """Mean squared pixel distance over the pairs of one group's images [K, H, W, 3]."""
    pairs = list(combinations(range(len(px)), 2))
    if not pairs:
        return 0.0
    return float(np.mean([np.mean((px[i] - px[j]) ** 2) for i, j in pairs]))


def diversity_by_group(images: Sequence[Any], groups: Sequence[int]) -> dict[int, float]:
    """{group: its diversity} for the groups of `images` (images of one group together or not)."""
    px = pixels(images)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    return {g: group_diversity(px[idx]) for g, idx in members.items()}


def drift(now: np.ndarray, initial: np.ndarray) -> float:
    """Mean squared pixel distance (in [0, 1] units) between uint8 images [M, H, W, 3] and the initial
    model's at the same jobs."""
    return float(np.mean((now.astype(np.float64) / 255.0 - initial.astype(np.float64) / 255.0) ** 2))


def falling_for(history: Sequence[float | None]) -> int:
    """How many rounds in a row, ending with the last, the held-out reward fell below the round before."""
    n = 0
    for before, now in zip(history[-2::-1], history[::-1], strict=False):
        if before is None or now is None or not now < before:
            break
        n += 1
    return n
