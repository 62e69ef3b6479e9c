"""`xdpo digits make-pairs`: a Pick-a-Pic-schema file the core data loader reads, labels as configured."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq

from xdpo.cli import main
from xdpo.data import PreferencePairs, load_preference_table
from xdpo.digits.labeller import LabellerSettings
from xdpo.digits.pairs import make_pairs, sidecar_path


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
