"""Summary statistics: bootstrap intervals and same-seed win rates on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from xdpo.errors import DataError
from xdpo.evaluate import stats
from xdpo.evaluate.stats import bootstrap_ci, keyed_scores, summarize, win_rate


def test_constant_data_has_zero_width_interval():
    lo, hi = bootstrap_ci(np.full(50, 3.25))
    assert lo == hi == 3.25
    s = summarize([2.0] * 7)
    assert s == {"n": 7, "mean": 2.0, "median": 2.0, "std": 0.0, "ci95": [2.0, 2.0]}


def test_interval_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (25, 400):
        x = rng.normal(1.0, 2.0, size=n)
        lo, hi = bootstrap_ci(x)
        assert lo < x.mean() < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(16) = 1/4


def test_interval_matches_the_normal_approximation():
    x = np.tile([0.0, 1.0], 200)  # p = 0.5, n = 400: half-width 1.96 * sqrt(0.25 / 400) = 0.049
    lo, hi = bootstrap_ci(x, n_resamples=4000)
    assert lo == pytest.approx(0.451, abs=0.012)
    assert hi == pytest.approx(0.549, abs=0.012)


def test_bootstrap_is_seeded_and_chunked(monkeypatch):
    x = np.arange(30.0)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 30 * 7)  # 7 resamples per chunk
    lo, hi = bootstrap_ci(x, n_resamples=500)
    assert lo < 14.5 < hi
    median_ci = bootstrap_ci(x, stat=lambda a: np.median(a, axis=1))
    assert median_ci[0] < 14.5 < median_ci[1]


def test_bad_values_are_errors():
    with pytest.raises(DataError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(DataError, match="non-finite"):
        summarize([1.0, float("nan")])


def test_win_rate_matches_by_key_with_ties_and_unmatched_rows():
    a = {("p", 0): 1.0, ("p", 1): 2.0, ("q", 0): 3.0, ("only-a", 0): 5.0}
    b = {("p", 0): 0.0, ("p", 1): 2.0, ("q", 0): 4.0, ("only-b", 7): 9.0, ("q", 1): 0.0}
    r = win_rate(a, b)
    assert r["win_rate"] == 0.5  # one win, one tie (0.5), one loss
    assert (r["wins"], r["ties"], r["losses"]) == (1, 1, 1)
    assert (r["n_matched"], r["n_a"], r["n_b"]) == (3, 4, 5)
    assert (r["n_unmatched_a"], r["n_unmatched_b"]) == (1, 2)
    assert r["mean_diff"] == pytest.approx(0.0)
    assert r["ci95"][0] <= 0.5 <= r["ci95"][1]


def test_win_rate_known_cases():
    keys = [(f"prompt {i}", s) for i in range(10) for s in range(3)]
    better = {k: 1.0 for k in keys}
    worse = {k: 0.0 for k in keys}
    assert win_rate(better, worse)["win_rate"] == 1.0
    assert win_rate(better, worse)["ci95"] == [1.0, 1.0]
    assert win_rate(worse, better)["win_rate"] == 0.0
    tied = win_rate(better, dict(better))
    assert tied["win_rate"] == 0.5 and tied["ties"] == 30
    # 3 of 4 matched pairs won; the unmatched row is ignored, not counted as a loss.
    a = {("x", 0): 2.0, ("x", 1): 2.0, ("y", 0): 2.0, ("y", 1): 0.0, ("z", 0): -9.0}
    b = {("x", 0): 1.0, ("x", 1): 1.0, ("y", 0): 1.0, ("y", 1): 1.0}
    assert win_rate(a, b, ci=False) == pytest.approx(
        {
            "win_rate": 0.75,
            "wins": 3,
            "ties": 0,
            "losses": 1,
            "n_matched": 4,
            "n_a": 5,
            "n_b": 4,
            "n_unmatched_a": 1,
            "n_unmatched_b": 0,
            "mean_diff": 0.5,
        }
    )
    # A tolerance turns near-equal scores into ties.
    assert win_rate({1: 1.0}, {1: 1.0 + 1e-9}, ci=False, tie_tol=1e-6)["ties"] == 1


def test_win_rate_without_matches_is_an_error():
    with pytest.raises(DataError, match=r"no \(prompt, seed\) pair matches \(1 vs 1 rows\)"):
        win_rate({("a", 0): 1.0}, {("a", 1): 1.0})


def test_keyed_scores_rejects_repeated_keys():
    assert keyed_scores([("a", 0), ("a", 1)], [1, 2]) == {("a", 0): 1.0, ("a", 1): 2.0}
    with pytest.raises(DataError, match=r"key \('a', 0\) appears twice"):
        keyed_scores([("a", 0), ("a", 0)], [1, 2], what="folder X")
