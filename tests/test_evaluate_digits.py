"""The digits scorers on real sklearn digits (upsampled to 32x32) with matching / non-matching prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xdpo.apps.digits.data import caption, load_digit_pils
from xdpo.evaluate.evaluate import evaluate_folder
from xdpo.evaluate.scorers import load_scorers

PER_DIGIT = 4


@pytest.fixture(scope="module")
def digits():
    """4 real images per digit (40), their labels, matching prompts and wrong-digit prompts."""
    images, labels = load_digit_pils(32)
    pick = np.concatenate([np.flatnonzero(labels == d)[:PER_DIGIT] for d in range(10)])
    imgs = [images[i] for i in pick]
    labs = labels[pick]
    right = [caption(int(d)) for d in labs]
    wrong = [caption(int(d + 3) % 10) for d in labs]
    return imgs, labs, right, wrong


@pytest.fixture(scope="module")
def scorers():
    return {s.name: s for s in load_scorers("digits-reward,digits-alignment")}


def test_scorer_interface(scorers, digits):
    imgs, _, right, _ = digits
    for name, s in scorers.items():
        assert s.name == name and "xdpo.apps.digits.labeller" in s.details
        out = s(imgs[:3], right[:3])
        assert out.dtype == np.float64 and out.shape == (3,) and np.all(np.isfinite(out))


def test_alignment_reads_the_prompted_digit(scorers, digits):
    imgs, _, right, wrong = digits
    match, mismatch = scorers["digits-alignment"](imgs, right), scorers["digits-alignment"](imgs, wrong)
    assert set(np.unique(np.concatenate([match, mismatch]))) <= {0.0, 1.0}
    assert match.mean() >= 0.9  # the classifier was trained on these real digits
    assert mismatch.mean() <= 0.1


def test_hidden_reward_prefers_the_prompted_digit(scorers, digits):
    imgs, _, right, wrong = digits
    match, mismatch = scorers["digits-reward"](imgs, right), scorers["digits-reward"](imgs, wrong)
    assert np.mean(match > mismatch) >= 0.9
    blank = [Image.new("RGB", (32, 32), (255, 255, 255))] * 3
    assert scorers["digits-reward"](blank, right[:3]).mean() < np.median(match)


def test_evaluate_right_digits_against_wrong_digits(tmp_path, digits):
    """Same prompts and seeds; A shows the prompted digit, B another one: A wins on both scorers."""
    imgs, labs, right, _ = digits
    by_digit = {int(d): imgs[i] for i, d in enumerate(labs)}
    for name, pictures in (("A", imgs), ("B", [by_digit[(int(d) + 3) % 10] for d in labs])):
        (tmp_path / name / "images").mkdir(parents=True)
        lines = []
        for i, (im, prompt) in enumerate(zip(pictures, right, strict=True)):
            im.save(tmp_path / name / "images" / f"{i:05d}.png")
            lines.append(json.dumps({"prompt": prompt, "seed": i % PER_DIGIT, "file": f"images/{i:05d}.png"}))
        (tmp_path / name / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    s = evaluate_folder(
        tmp_path / "A", "digits-reward,digits-alignment", baseline=tmp_path / "B", progress=False
    )
    for name in ("digits-reward", "digits-alignment"):
        w = s["scorers"][name]["vs_baseline"]
        assert w["n_matched"] == 40 and w["win_rate"] >= 0.9
        assert s["scorers"][name]["mean"] > s["scorers"][name]["baseline"]["mean"]
