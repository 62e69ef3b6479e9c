"""The digits world's second preference task (`slant`): the shear measure, its constants, its labeller, and
`make-pairs --task slant`."""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xdpo.apps.digits.data import load_digit_images
from xdpo.apps.digits.labeller import hidden_reward
from xdpo.apps.digits.pairs import sidecar_path
from xdpo.apps.digits.tasks import SLANT_STD, TASKS, get_task, slant, slant_reward, slant_score
from xdpo.cli import main
from xdpo.errors import DataError


def line(k: int, size: int = 32) -> np.ndarray:
    """A white page with a black stroke x = 16 - k (y - 16): leaning right (top to the right) for k > 0."""
    grey = np.full((size, size), 255, dtype=np.uint8)
    for y in range(6, 27):
        grey[y, 16 - k * (y - 16)] = 0
    return grey


def test_slant_is_the_shear_of_the_ink():
    assert slant(line(1)) == pytest.approx(1.0)
    assert slant(line(-1)) == pytest.approx(-1.0)
    assert slant(line(0)) == pytest.approx(0.0)
    assert slant(np.full((32, 32), 255, dtype=np.uint8)) == 0.0  # blank page
    assert slant(Image.fromarray(line(1))) == pytest.approx(1.0)  # PIL and arrays alike


def test_slant_constants_standardise_the_real_digits():
    grey, y = load_digit_images()
    z = slant_score(list(grey), y)
    for d in range(10):
        assert abs(z[y == d].mean()) < 0.01, d  # the class means are the real digits'
    assert z.std() == pytest.approx(1.0, abs=0.01)  # the pooled within-class std


def test_leaning_right_raises_the_slant_reward_not_the_bold_one():
    grey, y = load_digit_images()
    seven = Image.fromarray(grey[np.nonzero(y == 7)[0][0]])
    # x' = x + 0.3 (y - 16): the output's top samples the input further left, so the digit leans right
    leaned = seven.transform(seven.size, Image.Transform.AFFINE, (1, 0.3, -4.8, 0, 1, 0), fillcolor=255)
    prompts = ["a handwritten digit seven"] * 2
    r = slant_reward([seven, leaned], prompts)
    assert slant(leaned) - slant(seven) == pytest.approx(0.3, abs=0.08)
    assert r[1] - r[0] > 2.0  # ~0.3 / SLANT_STD standard deviations, minus any legibility lost
    assert 0.3 / SLANT_STD > 3.0
    bold = hidden_reward([seven, leaned], prompts)
    assert abs(bold[1] - bold[0]) < 1.0  # the first task barely notices


def test_task_registry():
    assert set(TASKS) == {"bold", "slant"}
    assert get_task("bold").labeller.noise == 0.05 and get_task("slant").labeller.noise == 0.1
    with pytest.raises(DataError, match="task 'tilt': expected one of bold, slant"):
        get_task("tilt")


def test_make_pairs_slant_labels_with_the_task(tmp_path):
    out = tmp_path / "slant.parquet"
    argv = ["digits", "make-pairs", "--out", str(out), "--n", "16", "--steps", "6", "--threads", "1"]
    assert main([*argv, "--task", "slant", "--noise", "0.0", "--tie-margin", "0.0"]) == 0
    t = pq.read_table(out).to_pydict()
    rec = json.loads(sidecar_path(out).read_text())
    assert rec["task"] == "slant" and rec["reward"]["slant_std"] == SLANT_STD
    assert rec["labeller"] == {"temperature": 0.5, "noise": 0.0, "tie_margin": 0.0, "tie_prob": 1.0}
    images = [Image.open(io.BytesIO(b)) for b in t["jpg_0"]]
    np.testing.assert_allclose(t["reward_0"], slant_reward(images, t["caption"]), atol=1e-9)
    label, r0, r1 = (np.array(t[c]) for c in ("label_0", "reward_0", "reward_1"))
    assert set(label) <= {0.0, 1.0}  # no ties at margin 0, no flips at noise 0
    agree = float((label == (r0 > r1)).mean())
    assert rec["agreement_with_true_reward"] == pytest.approx(agree)


def test_slant_scorer_is_registered():
    from xdpo.evaluate.scorers import load_scorers

    (scorer,) = load_scorers("digits-reward-slant")
    grey, y = load_digit_images()
    images = [Image.fromarray(g) for g in grey[:8]]
    prompts = [
        f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")
    ]
    np.testing.assert_allclose(
        scorer(images, prompts[: len(images)]), slant_reward(images, prompts[: len(images)])
    )
