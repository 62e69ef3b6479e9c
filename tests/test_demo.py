"""`xdpo demo --quick` end to end: the report, its table rows, the plots and the grid exist; the same on the
flow base (`--family flow`: Flow-DPO, xDPO, SFT on digits-flow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xdpo.apps.demo.report import steps_to_reach
from xdpo.apps.demo.run import CONFIGS, DEFAULT_OUT, DemoSettings
from xdpo.cli import main


def test_steps_to_reach_interpolates():
    curve = [(0, 0.0), (100, 1.0), (200, 3.0)]
    assert steps_to_reach(curve, 2.0) == pytest.approx(150.0)
    assert steps_to_reach(curve, 0.5) == pytest.approx(50.0)
    assert steps_to_reach(curve, 5.0) is None


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    # one thread: beside another test worker a second thread slows tiny workloads many-fold (docs/design.md)
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "xdpo", "demo", "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Report: {out / 'report.md'}" in proc.stdout
    report = (out / "report.md").read_text()
    for row in ("| base |", "| Diffusion-DPO |", "| xDPO (Appendix C) |", "| xDPO (Eq. 9) |", "| SFT |"):
        assert row in report
    assert "win rate vs Diffusion-DPO" in report and "Steps to reach" in report
    for name in ("curves.png", "training.png", "grid.png", "pairs.parquet", "results.json", "curves.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]][0] == "base"
    curves = json.loads((out / "curves.json").read_text())
    assert all(len(points) >= 2 for points in curves["runs"].values())  # base + at least one checkpoint
    # a second run reuses everything (resumable demo) and is fast
    again = subprocess.run(
        [sys.executable, "-m", "xdpo", "demo", "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0 and "reusing" in again.stdout


def test_flow_family_settings(capsys):
    from xdpo.config import load_config

    s = DemoSettings.make("x", family="flow")
    assert s.base == "digits-flow" and [m.name for m in s.methods][0] == "Flow-DPO"
    assert (
        DemoSettings.make("x").base == "digits" and DemoSettings.make("x").methods[0].name == "Diffusion-DPO"
    )
    assert DEFAULT_OUT == {"sd": "outputs/digits-demo", "flow": "outputs/digits-flow-demo"}
    for m in s.methods:
        cfg = load_config(CONFIGS / m.config, ["data.path=x"])
        assert cfg.model.pretrained == "digits-flow" and cfg.timesteps.sampling == "logit_normal"
        assert cfg.loss.beta_schedule == "constant"
    assert main(["demo", "--family", "flow", "--ablation", "--out", "unused"]) == 2
    assert "--family sd" in capsys.readouterr().err


@pytest.mark.slow
def test_a_small_flow_demo_writes_the_report(tmp_path):
    """The flow demo's stages in this process at smaller than --quick settings (the CLI path is the UNet test's)."""
    from dataclasses import replace

    from xdpo.apps.demo.run import run_demo
    from xdpo.apps.digits import flow_base_model_path

    out = tmp_path / "flow-demo"
    quick = DemoSettings.make(out, quick=True, family="flow")
    s = replace(quick, n_pairs=48, max_steps=8, eval_seeds=1)
    assert run_demo(out, settings=s) == out / "report.md"
    report = (out / "report.md").read_text()
    assert report.startswith("# xdpo digits demo, flow family (digits-flow)")
    for row in ("| base |", "| Flow-DPO |", "| xDPO (Appendix C) |", "| xDPO (Eq. 9) |", "| SFT |"):
        assert row in report
    assert "win rate vs Flow-DPO" in report and "Steps to reach Flow-DPO's final reward" in report
    assert "Diffusion-DPO |" not in report
    pairs = json.loads((out / "pairs.parquet.json").read_text())
    assert pairs["model"] == str(flow_base_model_path())
    assert pairs["sampling"]["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    manifest = json.loads((out / "samples" / "dpo-s0" / "manifest.jsonl").read_text().splitlines()[0])
    assert (manifest["steps"], manifest["guidance"]) == (25, 3.0)  # digits-flow's own sampling defaults
    assert manifest["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    curves = json.loads((out / "curves.json").read_text())
    assert all(len(points) >= 2 for points in curves["runs"].values())
    assert (out / "runs" / "dpo-s0" / "final" / "transformer").is_dir()
    for name in ("curves.png", "training.png", "grid.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
