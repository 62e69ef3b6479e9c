"""`xdpo study`: the plan's fairness, the statistics against closed forms, one real job end to end (train,
evaluate, clean up, reuse), and the report from results shaped like a real study's."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from xdpo.apps.study import plan, stats
from xdpo.apps.study.plan import Job, StudySettings, main_jobs, sweep_jobs
from xdpo.apps.study.runner import NDELTA_BINS, delta_summary


def test_every_beta_method_gets_the_same_sweep_budget(tmp_path):
    s = StudySettings.make(tmp_path)
    jobs = sweep_jobs(s)
    for world in s.worlds:
        budget = {m: sum(j.world == world and j.method == m for j in jobs) for m in plan.METHODS}
        beta_methods = [m for m in ("dpo", "xdpo", "xdpo-eq9", "kto") if plan.config_of(m, world)]
        assert len({budget[m] for m in beta_methods}) == 1, budget
        assert budget["sft"] == len(plan.SFT_LRS)
    assert len({j.name for j in jobs}) == len(jobs)
    assert all(j.seed not in s.seeds for j in jobs)  # the sweep's seed is not a reported seed


def test_main_jobs_match_initial_effective_beta_and_run_the_ablation_on_the_unet_base(tmp_path):
    s = StudySettings.make(tmp_path)
    chosen = {w: {m: {"beta": 300.0, "lr": 3e-5} for m in plan.METHODS} for w in s.worlds}
    chosen["sd"]["dpo"] = {"beta": 210.0, "lr": 1e-4}
    jobs = main_jobs(s, chosen)
    matched = [j for j in jobs if j.method == "xdpo-matched" and j.world == "sd"]
    assert [j.seed for j in matched] == list(s.seeds)
    # Appendix C's slope at delta = 0 is eta + gamma n = 1.05: beta_x * 1.05 = beta_DPO
    assert all(j.beta * 1.05 == pytest.approx(210.0) and j.lr == 1e-4 for j in matched)
    ablation = {j.method for j in jobs if j.method in plan.ABLATION}
    assert ablation == set(plan.ABLATION) and all(j.world == "sd" for j in jobs if j.method in plan.ABLATION)
    tau4 = [j for j in jobs if j.method == "dpo-tau4"]
    assert all(j.steps == 2 * s.steps and "reference.max_divergence=1e9" in j.overrides for j in tau4)
    assert len({j.name for j in jobs}) == len(jobs)


def test_t_interval_and_paired_differences():
    m, lo, hi = stats.t_interval([1.0, 2.0, 4.0])
    half = student_t.ppf(0.975, 2) * np.std([1.0, 2.0, 4.0], ddof=1) / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half))
    a = [
        {"job": {"seed": s}, "final": {"mean_reward": r, "reward": [r] * 4}} for s, r in [(0, 1.0), (1, 2.0)]
    ]
    b = [
        {"job": {"seed": s}, "final": {"mean_reward": r, "reward": [0.5] * 4}}
        for s, r in [(1, 1.5), (0, 0.0)]
    ]
    assert stats.diff_interval(a, b)[0] == pytest.approx(0.75)  # paired by seed: (1 - 0) and (2 - 1.5)
    assert stats.win(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])) == pytest.approx(0.5)
    assert stats.win_interval(a, b)[0] == 1.0


def _curves(points, seeds=(0, 1, 2)):
    return [{"job": {"seed": s}, "curve": [[st, r + 0.01 * s] for st, r in points]} for s in seeds]


def test_steps_to_reach_a_twice_faster_curve():
    slow = _curves([(0, 0.0), (100, 1.0), (200, 2.0)])
    fast = _curves([(0, 0.0), (100, 2.0), (200, 2.5)])
    r = stats.steps_to_reach_baseline(fast, slow)
    assert r["steps"] == pytest.approx(100.5, abs=0.6) and r["baseline_steps"] == pytest.approx(200)
    assert r["ratio"] == pytest.approx(2.0, rel=0.01)
    assert r["ratio_ci"][0] > 1.9 and r["reached_fraction"] == 1.0
    never = stats.steps_to_reach_baseline(_curves([(0, 0.0), (100, 0.5), (200, 1.0)]), slow)
    assert never["steps"] == math.inf and never["ratio"] == 0.0
    longer = _curves([(0, 0.0), (100, 2.0), (200, 2.5), (300, 9.0)])  # compared within the baseline's steps
    assert stats.steps_to_reach_baseline(longer, slow)["ratio"] == pytest.approx(2.0, rel=0.01)


def test_delta_histograms_and_the_xdpo_slope():
    rng = np.random.default_rng(0)
    metrics = [{"step": k, "deltas": (rng.normal(0, 0.3 * k / 30, 32)).tolist()} for k in range(1, 31)]
    d = delta_summary(metrics, 30)
    assert len(d["phases"]) == 3 and d["phases"][0]["steps"] == [1, 10]
    assert [sum(p["counts"]) for p in d["phases"]] == [320, 320, 320]
    assert d["phases"][0]["beyond_1"] < d["phases"][2]["beyond_1"]  # spread grows with k
    counts = np.zeros(len(NDELTA_BINS) - 1)
    counts[17] = 5  # the bin [0, 0.25]: centre 0.125
    assert stats.xdpo_slope_ratio(counts.tolist(), d["bins"]) == pytest.approx(
        (0.05 + math.exp(0.125)) / 1.05
    )
    assert stats.xdpo_slope_ratio(counts.tolist(), d["bins"], "eq9") == pytest.approx(
        (0.05 + math.exp(-0.125)) / 1.05
    )
    assert delta_summary([{"step": 1, "loss": 0.1}], 1)["phases"] == []  # no deltas logged (SFT)


@pytest.fixture(scope="module")
def one_job(tmp_path_factory):
    """One real study job on the UNet base: 4 steps, 2 curve points, 1 eval seed (~30 s)."""
    from xdpo.apps.digits.pairs import make_pairs
    from xdpo.apps.study.runner import run_job

    out = tmp_path_factory.mktemp("study")
    s = StudySettings(out, worlds=("sd",), steps=4, seeds=(0,), curve_points=2, curve_seeds=1, eval_seeds=2)
    make_pairs(out / "pairs" / "sd.parquet", 24, seed=0, model="digits", progress=False)
    job = Job("sd", "main", "dpo", "digits-dpo.yaml", 300.0, 3e-5, 0, 4, 2)
    return s, job, run_job(job, s)


def test_a_job_trains_evaluates_and_cleans_up(one_job):
    from xdpo.apps.study.runner import run_job

    s, job, res = one_job
    folder = s.out / "runs" / job.name
    assert [p[0] for p in res["curve"]] == [0, 2, 4]  # the base, then each checkpoint (the last = final)
    assert len(res["final"]["reward"]) == 40 and res["final"]["diversity"] > 0
    assert res["final"]["mean_reward"] == pytest.approx(np.mean(res["final"]["reward"]))
    assert len(res["delta"]["phases"]) == 3 and res["delta"]["per_step"]
    assert (folder / "metrics.jsonl").is_file() and not (folder / "checkpoints").exists()
    assert not (folder / "final").exists()
    stamp = (folder / "result.json").stat().st_mtime_ns
    assert run_job(job, s) == res and (folder / "result.json").stat().st_mtime_ns == stamp  # reused


def test_report_from_study_shaped_results(one_job):
    """The report from results shaped like a study's (copies of one real job under each method's name)."""
    from xdpo.apps.study.report import write_report

    s, job, res = one_job
    main, sweep = {}, {}
    for method in ("dpo", "xdpo", "xdpo-eq9", "xdpo-matched", "sft", "kto", *plan.ABLATION):
        for seed, bump in ((0, 0.0), (1, 0.1), (2, 0.3)):
            r = copy.deepcopy(res)
            r["job"] |= {"method": method, "seed": seed}
            r["final"]["reward"] = [x + bump for x in r["final"]["reward"]]
            r["final"]["mean_reward"] += bump
            main[f"{method}-{seed}"] = r
    for method in ("dpo", "xdpo"):
        for beta in (30.0, 300.0):
            r = copy.deepcopy(res)
            r["job"] |= {"method": method, "beta": beta, "stage": "sweep"}
            sweep[f"{method}-{beta}"] = r
    from xdpo.apps.study.run import select

    chosen = select(s, sweep)
    report = write_report(s, sweep, chosen, main, {"3/4 main": 60.0}, {"total": 120.0})
    text = report.read_text()
    for needle in ("| Diffusion-DPO |", "| xDPO (Appendix C), matched beta |", "## Kang et al. ablation",
                   "+ timestep-aware", "Plain answers", "Ends higher?", "Where in delta"):  # fmt: skip
        assert needle in text, needle
    assert (s.out / "curves_sd.png").stat().st_size > 0 and (s.out / "delta_sd.png").stat().st_size > 0
    results = json.loads((s.out / "results.json").read_text())
    assert results["rows"]["sd"]["xdpo"]["vs_dpo"][0] == pytest.approx(0.0)  # identical runs: no difference
    assert results["selection"]["chosen"]["sd"]["dpo"]["beta"] in (30.0, 300.0)
