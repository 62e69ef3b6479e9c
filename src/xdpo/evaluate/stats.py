"""Summary statistics: mean, median, percentile-bootstrap intervals, Student-t intervals over seeds, same-seed
win rates.

Everything is seeded numpy; bootstrap resamples are drawn in vectorised chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import numpy as np

from xdpo.errors import DataError

N_RESAMPLES = 2000
CHUNK_ELEMENTS = 4_000_000  # bound the (resamples x n) index matrix to ~32 MB


def _as_1d(values: Iterable[float], what: str) -> np.ndarray:
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if x.size == 0:
        raise DataError(f"{what}: no values")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def bootstrap_ci(
    values: Iterable[float],
    *,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` (default: the mean) over `values`.

    `stat` maps an array of shape [resamples, n] to shape [resamples] (e.g. `lambda a: a.mean(1)`).
    """
    x = _as_1d(values, "bootstrap")
    stat = stat or (lambda a: a.mean(axis=1))
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_ELEMENTS // x.size)
    stats = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_resamples - start), x.size))
        stats.append(stat(x[idx]))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.concatenate(stats), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(values: Iterable[float], *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """n, mean, median, std and the 95% bootstrap interval of the mean."""
    x = _as_1d(values, "summary")
    lo, hi = bootstrap_ci(x, n_resamples=n_resamples, seed=seed)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "ci95": [lo, hi],
    }


def keyed_scores(
    keys: Iterable[Hashable], scores: Iterable[float], *, what: str = "scores"
) -> dict[Hashable, float]:
    """A key -> score dict; a repeated key is an error (matching would be ambiguous)."""
    out: dict[Hashable, float] = {}
    for key, score in zip(keys, scores, strict=True):
        if key in out:
            raise DataError(f"{what}: key {key!r} appears twice; (prompt, seed) must be unique")
        out[key] = float(score)
    return out


def win_rate(
    a: Mapping[Hashable, float],
    b: Mapping[Hashable, float],
    *,
    ci: bool = True,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    tie_tol: float = 0.0,
) -> dict[str, Any]:
    """Win rate of A over B on the keys (e.g. (prompt, seed)) present in both; ties count 0.5.

    Returns win_rate, wins/ties/losses, n_matched, n_a, n_b, n_unmatched_a/b, mean_diff (A - B)
    and, with `ci`, a paired bootstrap 95% interval `ci95` over the matched pairs.
    Raises DataError when no key matches.
    """
    matched = [k for k in a if k in b]
    if not matched:
        raise DataError(f"win rate: no (prompt, seed) pair matches ({len(a)} vs {len(b)} rows)")
    diff = np.array([a[k] - b[k] for k in matched], dtype=np.float64)
    outcome = np.where(np.abs(diff) <= tie_tol, 0.5, (diff > 0).astype(np.float64))
    result: dict[str, Any] = {
        "win_rate": float(outcome.mean()),
        "wins": int((outcome == 1.0).sum()),
        "ties": int((outcome == 0.5).sum()),
        "losses": int((outcome == 0.0).sum()),
        "n_matched": len(matched),
        "n_a": len(a),
        "n_b": len(b),
        "n_unmatched_a": len(a) - len(matched),
        "n_unmatched_b": len(b) - len(matched),
        "mean_diff": float(diff.mean()),
    }
    if ci:
        result["ci95"] = list(bootstrap_ci(outcome, n_resamples=n_resamples, seed=seed))
    return result


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over seeds (mean +- t_{n-1} sd / sqrt n); a single value has
    no interval (nan)."""
    from scipy.stats import t

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half
