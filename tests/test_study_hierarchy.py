"""The study's second-edition statistics on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from xdpo.apps.study.hierarchy import (
    VERDICTS,
    bracket,
    grand_mean,
    hierarchical_bootstrap,
    reach_share,
    resample_means,
    verdict,
    wilson,
)


def tree(values: dict[tuple[int, int], np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in values.items()}


def test_no_variance_collapses_the_interval():
    t = tree({(p, s): np.full(20, 1.5) for p in range(3) for s in range(5)})
    assert hierarchical_bootstrap(t, n_resamples=200) == (1.5, 1.5, 1.5)


def test_pair_set_variance_is_in_the_interval():
    # three pair sets whose every seed and image reads 0, 1 or 2: only the top level varies. The mean of
    # three draws from {0, 1, 2} is 0 or 2 with probability 1/27 each (> 2.5%), so the interval is [0, 2];
    # a bootstrap over seeds or images alone would give [1, 1]
    t = tree({(p, s): np.full(10, float(p)) for p in range(3) for s in range(4)})
    mean, lo, hi = hierarchical_bootstrap(t, n_resamples=4000)
    assert (mean, lo, hi) == (1.0, 0.0, 2.0)


def test_image_variance_is_in_the_interval():
    rng = np.random.default_rng(0)
    images = rng.normal(0.0, 1.0, 400)
    t = tree({(0, s): images for s in range(3)})  # one pair set, identical seeds: only the images vary
    mean, lo, hi = hierarchical_bootstrap(t, n_resamples=2000)
    se = images.std(ddof=1) / np.sqrt(images.size)
    assert mean == pytest.approx(images.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_pairing_removes_shared_variance():
    rng = np.random.default_rng(1)
    b = tree({(p, s): rng.normal(p, 1.0, 50) for p in range(3) for s in range(3)})
    a = {k: v + 0.3 for k, v in b.items()}  # a = b + 0.3 on every image
    mean, lo, hi = hierarchical_bootstrap(a, b, n_resamples=300)
    assert (mean, lo, hi) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="leaves"):
        hierarchical_bootstrap(a, {k: v for k, v in b.items() if k != (0, 0)})


def test_grand_mean_weights_pair_sets_equally():
    # pair set 0 has one seed at 0, pair set 1 three seeds at 1: the mean over pair sets is 0.5, not 0.75
    t = tree({(0, 0): np.zeros(4), (1, 0): np.ones(4), (1, 1): np.ones(4), (1, 2): np.ones(4)})
    assert float(grand_mean(t)) == 0.5


def curves(last: np.ndarray, first: float = 0.0) -> np.ndarray:
    """[2 checkpoints, images]: every image at `first` at step 0, at `last` at step 10."""
    return np.stack([np.full(last.shape, first), last])


def test_reach_interpolates_between_checkpoints():
    base = tree({(0, s): curves(np.full(30, 1.0)) for s in range(3)})
    fast = tree({(0, s): curves(np.full(30, 2.0)) for s in range(3)})
    r = reach_share([0, 10], fast, base, n_resamples=200)
    assert r["verdict"] == "reaches" and r["share"] == 1.0
    assert r["steps_median"] == pytest.approx(5.0) and r["steps_ci"] == pytest.approx([5.0, 5.0])
    slow = tree({(0, s): curves(np.full(30, 0.5)) for s in range(3)})
    r = reach_share([0, 10], slow, base, n_resamples=200)
    assert r["verdict"] == "does not reach" and r["share"] == 0.0


def test_a_curve_that_crosses_in_half_the_resamples_is_undecided():
    rng = np.random.default_rng(2)
    noise = rng.normal(0.0, 0.2, 41)
    last = 1.0 + noise - noise.mean()  # its images average exactly the target, with spread around it
    base = tree({(0, s): curves(np.full(41, 1.0)) for s in range(3)})
    method = tree({(0, s): curves(last) for s in range(3)})
    r = reach_share([0, 10], method, base, n_resamples=2000)
    assert 0.4 < r["share"] < 0.6
    assert r["verdict"] == "undecided"
    assert r["share_ci"][0] < r["share"] < r["share_ci"][1]


def test_wilson():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 100)[0] == 0.0 and wilson(100, 100)[1] == pytest.approx(1.0)


def test_verdicts_follow_the_interval():
    assert verdict("xDPO", "DPO", 0.2, 0.1, 0.3).startswith(
        "xDPO ends higher than DPO: +0.200 [+0.100, +0.300]"
    )
    assert verdict("xDPO", "DPO", -0.2, -0.3, -0.1).startswith("xDPO ends lower than DPO")
    assert "not separated" in verdict("xDPO", "DPO", 0.0, -0.1, 0.1)
    assert "not separated" in verdict("xDPO", "DPO", 0.05, 0.0, 0.1)  # an end on 0 does not exclude 0
    assert "no interval" in verdict("xDPO", "DPO", 0.1, float("nan"), float("nan"))
    for lo, hi in [(0.1, 0.3), (-0.3, -0.1), (-0.1, 0.1), (0.0, 0.0)]:  # exactly one condition holds
        assert sum(cond(lo, hi) for cond, _ in VERDICTS) == 1


def test_bracket_extends_a_winner_on_the_edge():
    assert bracket([10, 30, 100, 300], 300) == pytest.approx(900)
    assert bracket([10, 30, 100, 300], 10) == pytest.approx(10 / 3)
    assert bracket([10, 30, 100, 300], 30) is None
    assert bracket([-1.0, 0.0, 1.0], 1.0) == 2.0
    with pytest.raises(ValueError, match="not a grid value"):
        bracket([10, 30], 20)


def job_result(pair_set: int, seed: int, final: list[float], curve: list[list[float]] | None = None) -> dict:
    job = {"seed": seed, **({"pair_set": pair_set} if pair_set else {})}
    res = {"job": job, "final": {"reward": final}}
    if curve is not None:
        res["curve"] = [[10 * i, float(np.mean(c))] for i, c in enumerate(curve)]
        res["curve_rewards"] = curve
    return res


def test_trees_from_job_results():
    from xdpo.apps.study.hierarchy import curve_tree, final_tree

    results = [
        job_result(p, s, [p + s, p + s + 1.0], [[0.0, 0.0], [p, s]]) for p in range(2) for s in range(2)
    ]
    t = final_tree(results)
    assert set(t) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    np.testing.assert_array_equal(t[(1, 1)], [2.0, 3.0])
    steps, c = curve_tree(results)
    assert steps == [0, 10] and c[(1, 0)].shape == (2, 2)
    with pytest.raises(ValueError, match="no per-image curve rewards"):
        curve_tree([job_result(0, 0, [1.0])])


def test_nan_images_are_left_out_of_the_means():
    """A subset of images per leaf (NaN elsewhere): means over what is left; a leaf with none left counts 0."""
    leaves = {(0, 0): np.array([1.0, np.nan, 3.0]), (0, 1): np.array([np.nan, 5.0, np.nan])}
    assert grand_mean(leaves) == pytest.approx((2.0 + 5.0) / 2)
    boot = resample_means(leaves, n_resamples=200)
    assert np.nanmin(boot) >= 1.0 and np.nanmax(boot) <= 5.0 and np.isfinite(boot).mean() > 0.5  # empty: NaN


def test_reach_is_paired_with_the_baseline():
    """A curve that ends 0.02 above the baseline on every image (image noise 0.01, shared image effects of
    scale 1) reaches it in every resample when the two are resampled together."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1, 40)
    base = {
        (p, s): np.stack([shared * 0, shared]) + rng.normal(0, 0.01, (2, 40))
        for p in range(3)
        for s in range(5)
    }
    up = {k: np.stack([v[0], v[1] + 0.02]) for k, v in base.items()}
    r = reach_share([0, 200], up, base, n_resamples=400)
    assert r["share"] == 1.0 and r["verdict"] == "reaches"


def test_prompt_clusters_widen_the_interval():
    """20 prompts x 5 seeds; two prompts' digits fail at every seed: resampling prompts (with all their seeds)
    gives a wider interval than resampling single images."""
    effect = np.tile(np.where(np.isin(np.arange(20), [1, 6]), -0.6, 0.1), 5)  # seed-major, prompt-minor
    rng = np.random.default_rng(1)
    leaves = {(0, s): effect + rng.normal(0, 0.05, 100) for s in range(5)}
    _, lo_i, hi_i = hierarchical_bootstrap(leaves, n_resamples=1000)
    _, lo_p, hi_p = hierarchical_bootstrap(leaves, n_resamples=1000, prompts=20)
    assert hi_p - lo_p > 1.8 * (hi_i - lo_i)
    with pytest.raises(ValueError, match="20 prompts"):
        hierarchical_bootstrap({(0, 0): np.zeros(30)}, prompts=20)
