"""`xdpo study`, second edition: the plan (grid, replicates, matched betas), the sweep's bracketing on a known
reward surface, the report's verdicts on synthetic results with known answers, and one real job end to end
(calibration, training, evaluation, report)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from xdpo import preference_loss
from xdpo.apps.study import edition2 as e2
from xdpo.apps.study import run2
from xdpo.apps.study.calibrate import TABLE3, eq10_slope


def settings(tmp_path, **kw):
    s = e2.Settings.make2(tmp_path, worlds="sd", tasks="slant")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_the_plan_runs_the_noisy_task_first_on_a_4x3_grid(tmp_path, capsys):
    s = e2.Settings.make2(tmp_path)
    assert s.world_tasks() == [("sd", "slant"), ("flow", "slant"), ("sd", "bold"), ("flow", "bold")]
    grid = e2.first_grid(s, "flow")
    assert {m: len(p) for m, p in grid.items()} == {"dpo": 12, "xdpo": 12}
    assert sorted({b for b, _ in grid["dpo"]}) == [1.0, 3.0, 10.0, 30.0] and s.select_seeds * 20 >= 200
    est = e2.estimate(s)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total")) and est["sweep"] > 0
    run2.run_study2(tmp_path / "out", plan_only=True)
    assert "Estimated time on 2 free core(s)" in capsys.readouterr().out and not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="--tasks"):
        e2.Settings.make2(tmp_path, tasks="italic")


def test_the_online_arms_run_after_the_noisy_task_in_every_world(tmp_path):
    s = e2.Settings.make2(tmp_path)
    assert e2.stages(s) == [
        ("offline", "sd", "slant"), ("offline", "flow", "slant"), ("online", "sd", "slant"),
        ("online", "flow", "slant"), ("offline", "sd", "bold"), ("offline", "flow", "bold"),
    ]  # fmt: skip
    assert e2.stages(e2.Settings.make2(tmp_path, tasks="bold", worlds="flow")) == [
        ("offline", "flow", "bold")
    ]
    assert e2.estimate(s)["online"] > 0 and "online" not in e2.estimate(
        e2.Settings.make2(tmp_path, tasks="bold")
    )


def test_main_arms_replicate_over_seeds_and_pair_sets_and_match_xdpos_beta(tmp_path):
    s = settings(tmp_path)
    chosen = {"dpo": {"beta": 30.0, "lr": 3e-5}, "xdpo": {"beta": 100.0, "lr": 1e-4}}
    jobs = e2.main_jobs(s, "sd", "slant", chosen)
    assert len(jobs) == 3 * 5 * 3 and {j.pair_set for j in jobs} == {0, 1, 2}
    at = [j for j in jobs if j.method == "dpo-at-xdpo"]
    assert {(j.beta, j.lr, j.config) for j in at} == {(105.0, 1e-4, "digits-dpo.yaml")}
    assert [j.method for j in jobs[:3]] == ["dpo", "xdpo", "dpo-at-xdpo"]  # leaf by leaf
    assert all(j.curve_points == s.curve_points and j.task == "slant" for j in jobs)


def test_the_ablation_is_at_diffusion_dpos_effective_beta(tmp_path):
    s = settings(tmp_path)
    chosen = {"dpo": {"beta": 30.0, "lr": 3e-5}, "xdpo": {"beta": 100.0, "lr": 1e-4}}
    jobs = {
        j.method: j for j in e2.ablation_jobs(s, "sd", "slant", chosen, {"eq10_slope": 1.6, "elements": 256})
    }
    for eta, n in TABLE3:
        j = jobs[e2.table3_key(eta, n)]
        assert j.beta == pytest.approx(30.0 / (eta + 1), rel=1e-5) and f"loss.eta={eta:g}" in j.overrides
    assert (
        jobs["eq10"].beta == pytest.approx(30 / 1.6) and "loss.divergence=xdpo_eq10" in jobs["eq10"].overrides
    )
    assert jobs["sum"].beta == pytest.approx(30 / (1.05 * 256), rel=1e-5)
    assert jobs["kang-stable"].config == "digits-dpo.yaml" and jobs["kang-stable"].beta == 30.0
    assert "timesteps.normalize=true" in jobs["kang-both"].overrides
    assert "reference.divergence=kang" in jobs["kang-stable"].overrides
    assert eq10_slope([0.0, 0.0]) == pytest.approx(1.05) and eq10_slope([0.2]) == pytest.approx(
        0.05 + math.exp(1.2)
    )


def fake_runner(peak_beta: float, peak_lr: float, calls: list):
    """run_jobs stand-in: the selection reward is a smooth bump around (peak_beta, peak_lr) in log space."""

    def run_jobs(jobs, s, what):
        calls.append(jobs)
        out = {}
        for j in jobs:
            r = (
                -((math.log10(j.beta / peak_beta)) ** 2)
                - (math.log10(j.lr / peak_lr)) ** 2
                + 0.01 * (j.seed - 100)
            )
            out[j.name] = {"job": j.as_dict(), "final": {"mean_reward": r, "alignment": [1.0], "drift": 0.1}}
        return out

    return run_jobs


def test_the_sweep_grows_until_the_winner_is_inside(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(run2, "run_jobs", fake_runner(1000.0, 3e-5, calls))
    s = settings(tmp_path)
    chosen, rec = run2.sweep(s, "sd", "slant")
    assert len(calls[0]) == 24 and len(calls[1]) == 2 * s.top_k  # the grid; the second seed at the top 3
    assert all(j.seed == 101 for j in calls[1])
    dpo = rec["methods"]["dpo"]
    # the edge winner's outward step, then the new winner's missing neighbours on both axes
    assert dpo["added"] == [(900.0, 3e-5), (2700.0, 3e-5), (900.0, 1e-5), (900.0, 1e-4)]
    assert dpo["still_on_edge"] == []
    assert chosen["dpo"]["beta"] == 900.0 and chosen["dpo"]["lr"] == 3e-5
    calls.clear()
    monkeypatch.setattr(run2, "run_jobs", fake_runner(1e9, 3e-5, calls))
    chosen, rec = run2.sweep(settings(tmp_path / "far"), "sd", "slant")
    assert len(rec["methods"]["xdpo"]["added"]) >= 3 and rec["methods"]["xdpo"]["still_on_edge"]  # capped


def synthetic(method: str, shift: float, pair_set: int, seed: int, n: int, rng) -> dict:
    """A result shaped like runner.run_job's: per-image rewards = a shared base + shift + noise."""
    base = np.linspace(-1, 1, n)
    final = base + shift + 0.05 * rng.standard_normal(n)
    curve = [base + shift * f + 0.05 * rng.standard_normal(n) for f in (0.0, 0.5, 1.0)]
    return {
        "job": {"world": "sd", "task": "slant", "stage": "main", "method": method, "beta": 30.0, "lr": 3e-5,
                "seed": seed, "pair_set": pair_set},
        "final": {"reward": final.tolist(), "alignment": [1.0] * n, "drift": 0.1 + shift, "diversity": 0.2,
                  "mean_reward": float(final.mean())},
        "curve": [[st, float(c.mean())] for st, c in zip((0, 100, 200), curve, strict=True)],
        "curve_rewards": [c.tolist() for c in curve],
        "train": {"ref_updates": 0, "ref_frozen_step": None},
    }  # fmt: skip


def test_the_report_words_verdicts_from_their_intervals(tmp_path):
    from xdpo.apps.study.report2 import write_report

    s = settings(tmp_path, seeds=(0, 1, 2), pair_sets=2)
    rng = np.random.default_rng(0)
    n = 20 * s.eval_seeds
    results = {}
    for p in range(2):
        for sd in s.seeds:
            for m, shift in (("dpo", 0.5), ("xdpo", 1.0), ("dpo-at-xdpo", 0.5)):
                results[f"{m}{p}{sd}"] = synthetic(m, shift, p, sd, n, rng)
    path = write_report(s, results, {}, {"sd-slant": 60.0})
    text = path.read_text()
    assert "xDPO (Appendix C) ends higher than Diffusion-DPO: +0.49" in text
    assert "Diffusion-DPO at xDPO's effective beta and Diffusion-DPO are not separated" in text
    assert "- xDPO (Appendix C) reaches Diffusion-DPO's final reward (100% of resamples" in text
    assert "Sweep not finished." in text
    assert "ends higher than Diffusion-DPO on the images both draw as prompted" in text and "(100% of" in text
    numbers = json.loads((tmp_path / "results.json").read_text())["offline"]["sd-slant"]
    assert numbers["arms"]["xdpo"]["leaves"] == 6 and numbers["arms"]["xdpo"]["pair_sets"] == 2
    assert len(numbers["per_class"]) == 10 and numbers["per_class"][0]["diff"][0] == pytest.approx(
        0.5, abs=0.05
    )


def test_one_real_job_end_to_end(tmp_path):
    """Pairs of the noisy task, Eq. 10's calibration on the base, one Eq. 10 ablation job trained (4 steps),
    evaluated and reported."""
    from xdpo.apps.digits.pairs import make_pairs
    from xdpo.apps.study.report2 import write_report
    from xdpo.apps.study.runner import run_job

    s = settings(tmp_path, steps=4, seeds=(0,), pair_sets=1, eval_seeds=1, n_pairs=24)
    make_pairs(
        tmp_path / "pairs" / "sd-slant.parquet", 24, seed=0, model="digits", progress=False, task="slant"
    )
    cal = run2.calibration(s, "sd", "slant")
    assert cal["elements"] > 0 and cal["eq10_slope"] > 1.05  # exp(n e_ref) > 1 for any error
    chosen = {"dpo": {"beta": 30.0, "lr": 3e-5}, "xdpo": {"beta": 30.0, "lr": 3e-5}}
    job = next(j for j in e2.ablation_jobs(s, "sd", "slant", chosen, cal) if j.method == "eq10")
    res = run_job(job, s)
    assert res["job"]["overrides"] == ["loss.divergence=xdpo_eq10"] and len(res["final"]["reward"]) == 20
    text = write_report(s, {job.name: res}, {}, {}).read_text()
    assert "| xDPO Eq. 10, matched beta |" in text and "no common runs yet" in text


def test_the_report_alone_reads_back_the_finished_runs(tmp_path):
    """`xdpo study --report`: the main runs finished so far, found from selection.json, reported; runs
    evaluated on other image counts are not taken."""
    s = settings(tmp_path, seeds=(0, 1), pair_sets=2)
    chosen = {
        "dpo": {"beta": 30.0, "lr": 1e-4, "reward": 1.0},
        "xdpo": {"beta": 30.0, "lr": 1e-4, "reward": 1.0},
    }
    rec = {"sweep_seeds": [100, 101], "methods": {m: {"chosen": c, "grid": [], "added": [], "still_on_edge": []}
                                                  for m, c in chosen.items()}}  # fmt: skip
    (tmp_path / "selection.json").write_text(json.dumps({"sd-slant": rec}))
    rng = np.random.default_rng(0)
    for j in e2.main_jobs(s, "sd", "slant", chosen):
        r = synthetic(j.method, 0.5 if j.method == "xdpo" else 0.0, j.pair_set, j.seed, 100, rng)
        r["job"] = j.as_dict()
        r["curve_rewards"] = [row[:40] for row in r["curve_rewards"]]
        if j.method == "dpo-at-xdpo" and j.seed == 1:
            r["final"]["reward"] = r["final"]["reward"][:20]  # evaluated otherwise: not this study's
        (tmp_path / "runs" / j.name).mkdir(parents=True)
        (tmp_path / "runs" / j.name / "result.json").write_text(json.dumps(r))
    done, online = run2.finished(s, json.loads((tmp_path / "selection.json").read_text()))
    assert len(done) == 3 * 2 * 2 - 2 and online == {}
    text = run2.run_study2(tmp_path, worlds="sd", tasks="slant", report_only=True).read_text()
    assert "xDPO (Appendix C) ends higher than Diffusion-DPO" in text and "| 2 (2) |" in text


def test_xdpo_eq10_slope_reads_the_reference_error_level():
    """The `xdpo_eq10` transform has the slope the calibration matches. Eq. 10's slope in -delta at delta = 0 is eta + gamma n exp(n e_ref): at e_ref = 0 it is the Appendix C
    form's 1.05, at e_ref = 0.2 it is 0.05 + exp(1.2) (docs/math.md §2)."""
    d = torch.tensor([1e-6, -2e-6], dtype=torch.float64)
    for level, slope in ((0.0, 1.05), (0.2, 0.05 + math.exp(1.2))):
        ref = torch.full((2,), level, dtype=torch.float64)
        a = preference_loss(ref + d, ref, ref, ref, divergence="xdpo_eq10", beta=1000.0)
        b = preference_loss(ref + d, ref, ref, ref, divergence="reverse_kl", beta=1000.0 * slope)
        torch.testing.assert_close(a.reward_margin, b.reward_margin, rtol=1e-4, atol=1e-9)


def test_the_same_seed_evaluator_scores_its_task():
    """The demos' evaluator with `task="slant"` reports the slant reward of its images, not the bold one."""
    from xdpo.apps.demo.run import SameSeedEvaluator
    from xdpo.apps.digits.labeller import hidden_reward
    from xdpo.apps.digits.tasks import slant_reward

    ev = SameSeedEvaluator(1, "digits", task="slant")
    images = ev.images()
    reward, _ = ev.score()
    assert reward == pytest.approx(float(np.mean(slant_reward(images, ev.prompts))))
    assert reward != pytest.approx(float(np.mean(hidden_reward(images, ev.prompts))))
