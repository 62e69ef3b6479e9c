"""Statistics for the study's second edition (issue: conclusions that survive a reviewer): replicates at the
data level, verdicts computed from intervals, and a sweep grid that brackets its winner.

- `hierarchical_bootstrap`: the final reward's mean over a nested design, pair sets > training seeds >
  evaluation images, resampled level by level (Davison & Hinkley 1997, §3.8: resample the top level, then
  within each drawn unit the next), so the interval covers the variance of the pair set and of the
  evaluation prompts as well as of the training seed. Two methods are compared paired at every level (same
  pair set, same seed, same image index), the difference resampled as one tree.
- `reach_share`: "does the method reach the baseline's final reward?" as the share of hierarchical
  resamples in which its mean curve reaches it (linear interpolation between checkpoints), with the steps
  to reach among the resamples that do; never a point estimate alone.
- `verdict`: the sentence of a comparison, chosen from data (`VERDICTS`) by what its interval shows; no
  sentence is printed unless its condition holds.
- `bracket`: the next grid value when a sweep's winner sits on the grid's edge.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# (pair set, training seed) -> one value per evaluation image [N], or a curve [points, N] per checkpoint
Tree = Mapping[tuple[int, int], np.ndarray]


def final_tree(results: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], np.ndarray]:
    """{(pair set, training seed): the final model's per-image rewards} of one arm's study jobs
    (`runner.run_job` results; a job without `pair_set` is pair set 0)."""
    return {_leaf(r): np.asarray(r["final"]["reward"], dtype=float) for r in results}


def curve_tree(results: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[tuple[int, int], np.ndarray]]:
    """(checkpoint steps, {(pair set, seed): per-image rewards [points, images]}) of one arm's jobs, from
    their `curve_rewards` (the base first, then every checkpoint)."""
    missing = [r["job"] for r in results if "curve_rewards" not in r]
    if missing:
        raise ValueError(f"no per-image curve rewards in {len(missing)} job result(s), e.g. {missing[0]}")
    steps = [int(p[0]) for p in results[0]["curve"]]
    return steps, {_leaf(r): np.asarray(r["curve_rewards"], dtype=float) for r in results}


def _leaf(result: Mapping[str, Any]) -> tuple[int, int]:
    job = result["job"]
    return int(job.get("pair_set", 0)), int(job["seed"])


def _levels(tree: Tree) -> dict[int, list[int]]:
    """pair set -> its training seeds, sorted."""
    out: dict[int, list[int]] = {}
    for p, s in sorted(tree):
        out.setdefault(p, []).append(s)
    return out


def resample_means(
    tree: Tree, n_resamples: int = 2000, seed: int = 0, prompts: int | None = None
) -> np.ndarray:
    """Hierarchical bootstrap of the grand mean over the last axis (images) of every leaf: per resample,
    draw pair sets with replacement, then seeds within each drawn pair set, then the images: one draw per
    resample, shared by every leaf (the images are the same held-out prompts and noise in every run). With
    `prompts` (images in seed-major, prompt-minor order, as the study samples them) the draw is of prompts,
    each with all its images (the prompts are the clusters: a method that fails one digit fails it at every
    seed); without, of single images. Returns [n_resamples] (or [n_resamples, points] for curves)."""
    levels = _levels(tree)
    sets = list(levels)
    leaf = np.asarray(next(iter(tree.values())))
    n_img = leaf.shape[-1]
    bad = [k for k, v in tree.items() if np.shape(v)[-1] != n_img]
    if bad:
        raise ValueError(
            f"leaves {bad[:3]} do not have {n_img} images like the first (evaluated differently?)"
        )
    if prompts is not None and n_img % prompts:
        raise ValueError(f"{n_img} images are not {prompts} prompts x whole seeds")
    grid = np.arange(n_img).reshape(-1, prompts) if prompts else None  # [seeds, prompts]
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, *leaf.shape[:-1]))
    for b in range(n_resamples):
        if grid is None:
            idx = rng.integers(0, n_img, n_img)
        else:
            idx = grid[:, rng.integers(0, prompts, prompts)].ravel()
        means = []
        for p in rng.choice(sets, len(sets)):
            seeds = levels[int(p)]
            for s in rng.choice(seeds, len(seeds)):
                means.append(_image_mean(np.asarray(tree[(int(p), int(s))])[..., idx]))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # every leaf empty: this resample is NaN
            out[b] = np.nanmean(means, axis=0)
    return out


def _image_mean(values: np.ndarray) -> np.ndarray:
    """The mean over images (the last axis), NaN images left out (a subset: e.g. the images two arms both draw
    as prompted); NaN for a leaf with no image left (the leaf drops out of the mean over leaves)."""
    with np.errstate(invalid="ignore"):
        n = np.isfinite(values).sum(-1)
        return np.where(n > 0, np.nansum(values, -1) / np.maximum(n, 1), np.nan)


def grand_mean(tree: Tree) -> np.ndarray:
    """The mean over images, then seeds within a pair set, then pair sets (the bootstrap's point)."""
    levels = _levels(tree)
    per_set = [
        np.nanmean([_image_mean(np.asarray(tree[(p, s)])) for s in seeds], axis=0)
        for p, seeds in levels.items()
    ]
    return np.nanmean(per_set, axis=0)


def hierarchical_bootstrap(
    a: Tree, b: Tree | None = None, n_resamples: int = 2000, seed: int = 0, prompts: int | None = None
) -> tuple[float, float, float]:
    """(mean, low, high): the 95% percentile interval of a's final reward, or of a - b paired at every
    level (b must hold the same pair sets, seeds and image count)."""
    if b is not None:
        if set(a) != set(b):
            raise ValueError(
                f"paired trees differ in their (pair set, seed) leaves: {sorted(set(a) ^ set(b))}"
            )
        a = {k: np.asarray(a[k]) - np.asarray(b[k]) for k in a}
    boot = resample_means(a, n_resamples, seed, prompts)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return float(grand_mean(a)), float(lo), float(hi)


def _first_reach(steps: np.ndarray, curve: np.ndarray, target: float) -> float:
    """The first step at which the curve reaches target, linear between checkpoints; inf if never."""
    above = np.nonzero(curve >= target)[0]
    if above.size == 0:
        return math.inf
    i = int(above[0])
    if i == 0:
        return float(steps[0])
    s0, s1, y0, y1 = steps[i - 1], steps[i], curve[i - 1], curve[i]
    return float(s0 + (target - y0) / (y1 - y0) * (s1 - s0))


def reach_share(
    steps: Sequence[float], curves: Tree, baseline: Tree, n_resamples: int = 2000, seed: int = 0,
    prompts: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Does the method's mean curve reach the baseline's final mean reward? Curves are [points, images]
    per (pair set, seed), evaluated at `steps`; the baseline's curves have the same leaves and images. Per
    hierarchical resample, drawn once for both (paired at every level: the baseline's last checkpoint is
    resampled as one more point of the method's curve): the target is that resample's baseline final reward,
    and the method reaches it or not. Returns the share that reach with its 95% Wilson interval (the
    resamples' Monte-Carlo error), the median and 95% range of the steps among those that reach, and the
    verdict: "reaches" when the share's interval lies above 0.975, "does not reach" below 0.025, else
    "undecided"."""
    if set(curves) != set(baseline):
        raise ValueError(f"paired trees differ in their leaves: {sorted(set(curves) ^ set(baseline))}")
    x = np.asarray(steps, dtype=float)
    joint = {k: np.concatenate([np.asarray(curves[k]), np.asarray(baseline[k])[-1:]]) for k in curves}
    m = resample_means(joint, n_resamples, seed, prompts)
    hits = np.asarray([_first_reach(x, m[i, :-1], m[i, -1]) for i in range(n_resamples)])
    reached = np.isfinite(hits)
    share = float(reached.mean())
    lo, hi = wilson(int(reached.sum()), n_resamples)
    if lo > 0.975:
        call = "reaches"
    elif hi < 0.025:
        call = "does not reach"
    else:
        call = "undecided"
    finite = hits[reached]
    return {
        "share": share,
        "share_ci": [lo, hi],
        "verdict": call,
        "steps_median": float(np.median(finite)) if finite.size else math.inf,
        "steps_ci": [float(v) for v in np.percentile(finite, [2.5, 97.5])] if finite.size else [math.inf] * 2,
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


# The verdicts of a difference a - b with its interval: (condition on (low, high), sentence). The sentence
# names both methods and the interval; exactly one condition holds for a finite interval.
VERDICTS: tuple[tuple[Callable[[float, float], bool], str], ...] = (
    (lambda lo, hi: lo > 0, "{a} ends higher than {b}: {diff}, the interval excludes 0"),
    (lambda lo, hi: hi < 0, "{a} ends lower than {b}: {diff}, the interval excludes 0"),
    (lambda lo, hi: lo <= 0 <= hi, "{a} and {b} are not separated: {diff}, the interval holds 0"),
)


def verdict(a: str, b: str, mean: float, low: float, high: float, digits: int = 3) -> str:
    """The one sentence of `VERDICTS` whose condition holds for (low, high)."""
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        return f"{a} vs {b}: no interval (too few replicates)"
    near = min(abs(low), abs(high))
    while digits < 6 and 0 < near < 0.5 * 10.0**-digits:  # the bound nearest 0 shows a nonzero digit
        digits += 1
    diff = f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    for cond, sentence in VERDICTS:
        if cond(low, high):
            return sentence.format(a=a, b=b, diff=diff)
    raise AssertionError("VERDICTS cover every finite interval")


def bracket(grid: Sequence[float], winner: float) -> float | None:
    """The value to add when `winner` sits on the edge of the sorted `grid` (at least 2 values): one more
    step of the grid's spacing beyond that edge (geometric when every value is positive, else linear);
    None when the winner is inside. The sweep repeats until it returns None."""
    g = sorted(float(v) for v in grid)
    if len(g) < 2:
        raise ValueError("a grid to bracket needs at least 2 values")
    if winner not in g:
        raise ValueError(f"the winner {winner:g} is not a grid value ({', '.join(f'{v:g}' for v in g)})")
    geometric = g[0] > 0
    if winner == g[0]:
        return g[0] * g[0] / g[1] if geometric else 2 * g[0] - g[1]
    if winner == g[-1]:
        return g[-1] * g[-1] / g[-2] if geometric else 2 * g[-1] - g[-2]
    return None
