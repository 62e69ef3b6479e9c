"""`xdpo demo --quick` end to end: the report, its table rows, the plots and the grid exist."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xdpo.demo.report import steps_to_reach


def test_steps_to_reach_interpolates():
    curve = [(0, 0.0), (100, 1.0), (200, 3.0)]
    assert steps_to_reach(curve, 2.0) == pytest.approx(150.0)
    assert steps_to_reach(curve, 0.5) == pytest.approx(50.0)
    assert steps_to_reach(curve, 5.0) is None


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
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
