"""`xdpo demo --online`: on-policy rounds vs one offline round at equal optimizer steps, end to end on a
small setting (3 rounds of 2 steps, 10 prompts), and a rerun that reuses every finished stage."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from xdpo.apps.demo.online import OnlineSettings, run_online
from xdpo.apps.demo.run import run_config
from xdpo.cli import main
from xdpo.config import to_dict
from xdpo.errors import ConfigError


def small(out) -> OnlineSettings:
    return OnlineSettings.make_online(
        out, quick=True, max_steps=6, n_prompts=10, per_prompt=2, sample_steps=3, eval_seeds=1
    )


def test_arms_differ_only_in_round_length(tmp_path):
    s = OnlineSettings.make_online(tmp_path)
    assert (s.max_steps, s.rounds, s.every, len(s.train_seeds)) == (120, 3, 40, 3)
    assert 120 // s.curve_points == 20  # checkpoints every 20 steps fall on the round boundaries 40 and 80
    off, on = (to_dict(run_config(s, m, 0, s.prompts_file)) for m in s.methods)
    assert (off["online"]["every"], on["online"]["every"]) == (120, 40)
    assert off["online"]["enabled"] and off["online"]["scorer"] == "digits-reward"
    assert off["reference"]["strategy"] == "frozen"
    for d in (off, on):
        d["online"]["every"] = 0
        d["output_dir"] = ""
    assert off == on  # the same config, steps, scorer, prompts and reference otherwise
    with pytest.raises(ConfigError, match="rounds"):
        OnlineSettings.make_online(tmp_path, max_steps=100)
    with pytest.raises(ConfigError, match="round boundaries"):
        OnlineSettings.make_online(tmp_path, curve_points=8)
    assert OnlineSettings.make_online(tmp_path, family="flow").methods[0].config == "digits-flow-dpo.yaml"


def test_online_and_ablation_is_an_error(capsys):
    assert main(["demo", "--online", "--ablation", "--out", "unused"]) == 2
    assert "--online and --ablation" in capsys.readouterr().err


@pytest.mark.slow
def test_online_demo_writes_the_report_and_resumes(tmp_path, capsys):
    s = small(tmp_path / "online")
    report = run_online(s.out, settings=s)
    text = report.read_text()
    for row in ("| base |", "| one offline round | 6 | 1 |", "| 3 on-policy rounds | 6 | 3 |"):
        assert row in text, row
    assert "Do on-policy rounds beat one offline round" in text and "reference **frozen**" in text
    for name in ("curves.png", "training.png", "grid.png", "curves.json", "results.json"):
        assert (s.out / name).stat().st_size > 0, name
    res = json.loads((s.out / "results.json").read_text())
    arms = res["arms"]
    assert set(arms) == {"offline", "online"}
    for arm in arms.values():  # equal optimizer steps: train_summary.json and metrics.jsonl alike
        assert arm["steps"] == arm["logged_steps"] == [6]
    assert [len(r) for r in arms["offline"]["rounds"]] == [1] and [
        len(r) for r in arms["online"]["rounds"]
    ] == [3]
    assert 0.0 <= res["online_vs_offline"]["pooled"]["win_rate"] <= 1.0
    assert len(res["online_vs_offline"]["pooled"]["ci95"]) == 2
    curves = json.loads((s.out / "curves.json").read_text())["runs"]
    assert [p[0] for p in curves["online-s0"]] == [p[0] for p in curves["offline-s0"]] == [0, 2, 4, 6]

    runs = s.out / "runs"
    r0 = [
        pq.read_table(runs / arm / "online" / "round-0000" / "pairs.parquet")
        for arm in ("offline-s0", "online-s0")
    ]
    assert r0[0].equals(r0[1])  # round 0: the same pairs from the base in both arms
    r1 = pq.read_table(runs / "online-s0" / "online" / "round-0001" / "pairs.parquet")
    assert r1.column("jpg_0").to_pylist() != r0[0].column("jpg_0").to_pylist()  # round 1: the policy's own
    assert not (runs / "offline-s0" / "online" / "round-0001").exists()

    finals = {p: p.stat().st_mtime_ns for p in runs.glob("*/final/train_summary.json")}
    capsys.readouterr()
    run_online(s.out, settings=small(s.out))  # a rerun: every finished stage reused, nothing trained again
    printed = capsys.readouterr().out
    assert printed.count(": reusing ") == 2 and "reusing " + str(s.out / "curves.json") in printed
    assert "Online round" not in printed and "steps ->" not in printed
    assert {p: p.stat().st_mtime_ns for p in finals} == finals
