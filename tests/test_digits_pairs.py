"""`xdpo digits make-pairs`: a Pick-a-Pic-schema file the core data loader reads, labels as configured;
from digits-flow too, and `xdpo train` trains on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq

from xdpo.apps.digits.labeller import LabellerSettings
from xdpo.apps.digits.pairs import make_pairs, sidecar_path
from xdpo.cli import main
from xdpo.data import PreferencePairs, load_preference_table


def test_make_pairs_cli_writes_pickapic_schema(tmp_path):
    out = tmp_path / "pairs.parquet"
    argv = ["digits", "make-pairs", "--out", str(out), "--n", "24", "--seed", "0", "--steps", "8"]
    assert main([*argv, "--tie-margin", "0.6", "--noise", "0.0", "--threads", "1"]) == 0
    t = pq.read_table(out).to_pydict()
    for col in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "reward_0", "reward_1", "digit"):
        assert len(t[col]) == 24, col
    label, r0, r1 = (np.array(t[c]) for c in ("label_0", "reward_0", "reward_1"))
    np.testing.assert_allclose(np.array(t["label_1"]), 1 - label)
    tie = label == 0.5
    assert tie.any() and not tie.all()
    assert (np.abs(r0 - r1)[tie] < 0.6).all()  # ties only within the margin (tie_prob 1)
    assert (tie == (np.abs(r0 - r1) < 0.6)).all()
    rec = json.loads(sidecar_path(out).read_text())
    assert rec["counts"]["ties"] == tie.sum() and rec["labeller"]["tie_margin"] == 0.6
    assert rec["seed"] == 0 and rec["n_pairs"] == 24 and rec["counts"]["noise_flips"] == 0

    table = load_preference_table(str(out))
    pairs = PreferencePairs(table, resolution=32)
    assert pairs.n_ties == tie.sum() and len(pairs) == 24 - tie.sum()
    item = pairs[0]
    assert tuple(item["pixel_w"].shape) == (3, 32, 32) and item["caption"]
    assert len(PreferencePairs(table, resolution=32, ties="keep")) == 24


def test_make_pairs_is_seeded(tmp_path):
    s = LabellerSettings()
    kw = {"steps": 4, "settings": s, "progress": False}
    a = make_pairs(tmp_path / "a.parquet", 4, seed=5, **kw)
    b = make_pairs(tmp_path / "b.parquet", 4, seed=5, **kw)
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.equals(tb)
    assert a["counts"] == b["counts"] and a["labeller"] == s.to_dict()


def test_flow_pairs_train_the_flow_base(tmp_path):
    """`make-pairs --model digits-flow` samples at digits-flow's own settings; `xdpo train` on the shipped
    digits-flow config reads the file and trains the SD3 transformer."""
    from xdpo.apps.digits import flow_base_model_path, flow_sampling
    from xdpo.evaluate.pipeline import sampling_defaults

    # the digits plugin registers digits-flow's recorded defaults (xdpo_digits.json) for `--model digits-flow`
    assert (
        sampling_defaults("digits-flow")
        == flow_sampling()
        == {"steps": 25, "guidance": 3.0, "scheduler": "default"}
    )

    out = tmp_path / "flow.parquet"
    argv = ["digits", "make-pairs", "--model", "digits-flow", "--out", str(out), "--n", "6", "--steps", "3"]
    assert main([*argv, "--threads", "1"]) == 0
    rec = json.loads(sidecar_path(out).read_text())
    assert rec["model"] == str(flow_base_model_path()) and rec["n_pairs"] == 6
    smp = rec["sampling"]
    assert smp["steps"] == 3 and smp["guidance"] == flow_sampling()["guidance"] == 3.0
    assert smp["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert pq.read_table(out).num_rows == 6

    config = Path(__file__).resolve().parents[1] / "src" / "xdpo" / "configs" / "digits-flow-dpo.yaml"
    run = tmp_path / "run"
    overrides = [f"data.path={out}", f"output_dir={run}", "train.max_steps=2", "train.batch_size=2"]
    assert main(["train", "--config", str(config), *overrides, "train.checkpoint_every=0"]) == 0
    assert (run / "final" / "transformer" / "config.json").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
