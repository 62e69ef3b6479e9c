"""From the raw scores of a round's groups to one score and one advantage per image (docs/math.md §11.1).

Raw scores r_ij (image i, reward part j with weight w_j), images in groups g(i) of K images of one prompt;
means and standard deviations are population ones (ddof 0), eps = 1e-4 (the online methods' codes):

- `reward_norm = sum` (DiffusionNFT's, AWM's and DGPO's codes: the weighted sum, then group advantages):
      s_i = sum_j w_j r_ij
      A_i = (s_i - mean_{g(i)} s) / (std(s) + eps),  std over the whole round (`std = global`) or g(i) (`group`)
- `reward_norm = gdpo` (GDPO, Liu et al. 2026, arXiv 2601.05242: each reward normalised in its group before
  combining, then one batch-wise normalisation, so no reward's scale dominates the sum):
      n_ij = (r_ij - mean_{g(i)} r_j) / (std_{g(i)} r_j + eps);  s_i = sum_j w_j n_ij
      A_i = (s_i - mean(s)) / (std(s) + eps)                        mean and std over the whole round
`s` ranks the images of a group (online DPO's best-vs-worst pairs); `A` is what the objectives weight by.
A group whose images score alike gets A = 0 (group std) or s - mean = 0 (both modes).
"""

from __future__ import annotations

import numpy as np

from xdpo.errors import ConfigError

EPS = 1e-4
NORMS = ("sum", "gdpo")
STDS = ("global", "group")


def _by_group(x: np.ndarray, group: np.ndarray, fn) -> np.ndarray:
    """fn over each group's values, broadcast back to its images."""
    out = np.empty_like(x, dtype=np.float64)
    for g in np.unique(group):
        sel = group == g
        out[sel] = fn(x[sel])
    return out


def group_advantages(
    score: np.ndarray, group: np.ndarray, std: str = "global", eps: float = EPS
) -> np.ndarray:
    """A_i = (s_i - mean_{g(i)} s) / (std + eps), the std over the round (`global`) or the group (`group`)."""
    if std not in STDS:
        raise ConfigError(f"online.advantage_std: {std!r} is not one of {', '.join(STDS)}")
    s = np.asarray(score, dtype=np.float64)
    centred = s - _by_group(s, group, np.mean)
    scale = np.std(s) if std == "global" else _by_group(s, group, np.std)
    return centred / (scale + eps)


def score_and_advantage(
    raw: np.ndarray, weights: np.ndarray, group: np.ndarray, *, norm: str = "sum", std: str = "global",
    eps: float = EPS,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(s, A) per image from raw scores [N, parts] (module docstring)."""
    raw = np.asarray(raw, dtype=np.float64).reshape(len(group), -1)
    w = np.asarray(weights, dtype=np.float64)
    if norm == "sum":
        s = np.zeros(raw.shape[0])
        for j, wj in enumerate(w):
            s += wj * raw[:, j]
        return s, group_advantages(s, group, std, eps)
    if norm != "gdpo":
        raise ConfigError(f"online.reward_norm: {norm!r} is not one of {', '.join(NORMS)}")
    s = np.zeros(raw.shape[0])
    for j, wj in enumerate(w):
        col = raw[:, j]
        s += wj * (col - _by_group(col, group, np.mean)) / (_by_group(col, group, np.std) + eps)
    return s, (s - s.mean()) / (np.std(s) + eps)
