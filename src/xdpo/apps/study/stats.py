"""The study's statistics over training seeds: t intervals, paired differences, same-seed win rates,
steps-to-reach with a bootstrap over seeds. Pure functions of the jobs' results (runner.run_job)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xdpo.apps.demo.report import steps_to_reach
from xdpo.evaluate.stats import t_interval

Runs = list[dict[str, Any]]  # the results of one method's seeds, in seed order


def by_seed(runs: Runs) -> dict[int, dict]:
    return {r["job"]["seed"]: r for r in runs}


def paired(a: Runs, b: Runs) -> list[tuple[dict, dict]]:
    """Runs of two methods with the same training seed (same pairs order, same evaluation noise)."""
    sa, sb = by_seed(a), by_seed(b)
    return [(sa[k], sb[k]) for k in sorted(sa) if k in sb]


def final_rewards(runs: Runs) -> list[float]:
    return [r["final"]["mean_reward"] for r in runs]


def diff_interval(a: Runs, b: Runs) -> tuple[float, float, float]:
    """Mean final reward of a minus b, paired by training seed, with its t interval."""
    return t_interval([x["final"]["mean_reward"] - y["final"]["mean_reward"] for x, y in paired(a, b)])


def win(a: list[float], b: list[float]) -> float:
    """Same-seed win rate of images a over b (ties count 1/2)."""
    x, y = np.asarray(a), np.asarray(b)
    return float(((x > y) + 0.5 * (x == y)).mean())


def win_interval(a: Runs, b: Runs | list[float]) -> tuple[float, float, float]:
    """Win rate of a's final images over b's at the same (prompt, seed), one value per training seed (b a
    list of floats: the base's images), with its t interval clipped to [0, 1]."""
    if b and isinstance(b[0], float):
        rates = [win(r["final"]["reward"], b) for r in a]  # type: ignore[arg-type]
    else:
        rates = [win(x["final"]["reward"], y["final"]["reward"]) for x, y in paired(a, b)]  # type: ignore[arg-type]
    m, lo, hi = t_interval(rates)
    return m, max(0.0, lo) if not math.isnan(lo) else lo, min(1.0, hi) if not math.isnan(hi) else hi


def curve_matrix(runs: Runs) -> tuple[np.ndarray, np.ndarray]:
    """(steps, rewards [seeds, points]) of runs evaluated at the same checkpoints."""
    steps = np.asarray([p[0] for p in runs[0]["curve"]])
    return steps, np.asarray([[p[1] for p in r["curve"]] for r in runs])


def curve_band(runs: Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, low, high): the mean reward-vs-step curve with a 95% t interval over seeds per point."""
    steps, y = curve_matrix(runs)
    rows = [t_interval(list(col)) for col in y.T]
    return steps, *(np.asarray(v) for v in zip(*rows, strict=True))


def _reach(steps: np.ndarray, mean_curve: np.ndarray, target: float) -> float:
    s = steps_to_reach(list(zip(steps.tolist(), mean_curve.tolist(), strict=True)), target)
    return math.inf if s is None else s


def steps_to_reach_baseline(
    runs: Runs, baseline: Runs, n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Steps the method's mean curve needs to reach the baseline's final mean reward (last curve point,
    linear interpolation between checkpoints), and the baseline's own steps to reach it; 95% percentile
    bootstrap over training seeds (both methods' seeds resampled). `ratio` = baseline steps / method steps
    (> 1: the method is faster; the xDPO paper reports ~1.5 on SD1.5). inf = not reached."""
    steps, y = curve_matrix(runs)
    bsteps, by = curve_matrix(baseline)
    common = np.intersect1d(steps, bsteps)  # a longer run is compared within the baseline's steps
    y, by = y[:, np.isin(steps, common)], by[:, np.isin(bsteps, common)]
    steps = common
    target = float(by[:, -1].mean())
    point = _reach(steps, y.mean(0), target)
    base_point = _reach(steps, by.mean(0), target)
    rng = np.random.default_rng(seed)
    boot, ratios = [], []
    for _ in range(n_resamples):
        yb = y[rng.integers(0, len(y), len(y))]
        bb = by[rng.integers(0, len(by), len(by))]
        t = float(bb[:, -1].mean())
        s_m, s_b = _reach(steps, yb.mean(0), t), _reach(steps, bb.mean(0), t)
        boot.append(s_m)
        ratios.append(s_b / s_m if math.isfinite(s_m) and s_m > 0 else 0.0)
    big = 1e18  # percentiles of a sample holding inf (not reached), without inf - inf
    lo, hi = (math.inf if v >= big else float(v) for v in np.percentile(np.minimum(boot, big), [2.5, 97.5]))
    rlo, rhi = np.percentile(ratios, [2.5, 97.5])
    ratio = base_point / point if math.isfinite(point) and point > 0 else 0.0
    return {
        "target": target,
        "steps": point,
        "steps_ci": [float(lo), float(hi)],
        "baseline_steps": base_point,
        "ratio": ratio,
        "ratio_ci": [float(rlo), float(rhi)],
        "reached_fraction": float(np.mean(np.isfinite(boot))),
    }


def xdpo_slope_ratio(counts: list[int], edges: list[float], form: str = "xdpo") -> float:
    """Mean slope of xDPO's transform over an n*delta histogram (bin centres; the two open tail bins at
    their inner edge +- 0.125), relative to its slope 1.05 at delta = 0: how much harder than Diffusion-DPO
    at beta x 1.05 xDPO pushed where its images were. Appendix C: eta + gamma n exp(n delta) = 0.05 +
    exp(n delta); Eq. 9: 0.05 + exp(-n delta) (docs/math.md §2)."""
    e = np.asarray(edges, dtype=float)
    c = np.asarray(counts, dtype=float)
    if c.sum() == 0 or e.size == 0:
        return math.nan
    centres = np.concatenate([[e[0] - 0.125], (e[:-1] + e[1:]) / 2, [e[-1] + 0.125]])
    slope = 0.05 + np.exp(centres if form == "xdpo" else -centres)
    return float((c * slope).sum() / c.sum() / 1.05)
