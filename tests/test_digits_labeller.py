"""The digits world's hidden labeller: prompt parsing, reward and alignment on known inputs, BT label statistics."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image, ImageFilter

from xdpo.apps.digits.data import caption, eval_prompts, load_digit_pils, train_prompts
from xdpo.apps.digits.labeller import (
    STYLE_CLIP,
    LabellerSettings,
    alignment,
    bt_labels,
    hidden_reward,
    legibility,
    parse_digit,
    style_score,
)
from xdpo.errors import DataError, XdpoError


@pytest.fixture(scope="module")
def real():
    pils, y = load_digit_pils()
    idx = np.random.default_rng(0).choice(len(y), 200, replace=False)
    return [pils[i] for i in idx], y[idx]


def test_parse_digit_phrasings():
    assert parse_digit("a handwritten digit seven") == 7
    assert parse_digit("the number 7") == 7
    assert parse_digit("A Handwritten Digit ZERO.") == 0
    assert parse_digit("the digit 3, written by hand") == 3
    for d in range(10):
        assert parse_digit(caption(d)) == d
    prompts = train_prompts() + eval_prompts()
    assert [parse_digit(p) for p in prompts] == [i % 10 for i in range(len(prompts))]
    assert "a handwritten digit seven" in train_prompts()
    assert not set(train_prompts()) & set(eval_prompts())


@pytest.mark.parametrize("bad", ["a handwritten digit", "", "the number 12", "a seven next to a 3"])
def test_parse_digit_errors(bad):
    with pytest.raises(DataError, match="names"):
        parse_digit(bad)
    assert issubclass(DataError, XdpoError)


def test_reward_and_alignment_known_answers(real):
    images, y = real
    right = [caption(int(d)) for d in y]
    wrong = [caption(int(d + 1) % 10) for d in y]
    assert alignment(images, right).mean() > 0.95
    assert alignment(images, wrong).mean() < 0.02
    r_right, r_wrong = hidden_reward(images, right), hidden_reward(images, wrong)
    assert r_right.shape == (200,) and r_right.dtype == np.float64
    assert (r_right > r_wrong).mean() > 0.97
    # the style term is standardised on the real digits: about mean 0, std 1
    s = style_score(images)
    assert abs(s.mean()) < 0.3 and 0.7 < s.std() < 1.3
    # a blank page: illegible and without ink, far below any real digit of the prompted class
    blank = [Image.new("RGB", (32, 32), "white")] * 10
    prompts = [caption(d) for d in range(10)]
    r_blank = hidden_reward(blank, prompts)
    np.testing.assert_allclose(style_score(blank), -STYLE_CLIP)
    assert r_blank.max() < np.percentile(r_right, 5)
    # bolder strokes (the hidden taste) raise the reward while staying legible
    bold = [im.filter(ImageFilter.MinFilter(3)) for im in images]
    assert (style_score(bold) > s).mean() > 0.95
    assert hidden_reward(bold, right).mean() > r_right.mean() + 1.0
    assert alignment(bold, right).mean() > 0.9
    # the reward is the sum of its documented parts
    np.testing.assert_allclose(r_right, legibility(images, right) + s)


def test_reward_input_errors(real):
    images, _ = real
    with pytest.raises(DataError):
        hidden_reward(images[:2], ["a handwritten digit one"])
    assert hidden_reward([], []).shape == (0,)


def test_bt_label_statistics():
    rng = np.random.default_rng(0)
    n = 40_000
    # ties: |d| < margin for half of the pairs, tie_prob 0.5 -> tie rate 0.25
    s = LabellerSettings(temperature=0.5, noise=0.1, tie_margin=0.5, tie_prob=0.5)
    d = rng.uniform(-1, 1, n)
    lab = bt_labels(d, np.zeros(n), s, rng)
    assert set(np.unique(lab.label_0)) == {0.0, 0.5, 1.0}
    assert abs(lab.tie.mean() - 0.25) < 0.01
    assert not (lab.tie & (np.abs(d) >= 0.5)).any()
    # noise: with huge gaps Bradley-Terry is deterministic, so disagreement == flip rate == noise
    d = rng.choice([-50.0, 50.0], n)
    lab = bt_labels(d, np.zeros(n), s, rng)
    wrong = lab.label_0 != (d > 0)
    assert not lab.tie.any()
    assert abs(wrong.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(wrong, lab.flipped)
    # Bradley-Terry: P(label_0 = 1) = sigmoid(d / T) without noise
    s0 = LabellerSettings(temperature=0.5, noise=0.0, tie_margin=0.0)
    lab = bt_labels(np.full(n, 0.5), np.zeros(n), s0, rng)
    assert abs(lab.label_0.mean() - 1 / (1 + np.exp(-1.0))) < 0.01
    # seeded: same rng seed, same labels
    a = bt_labels(d, np.zeros(n), s, np.random.default_rng(3)).label_0
    b = bt_labels(d, np.zeros(n), s, np.random.default_rng(3)).label_0
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0}, {"noise": 1.5}, {"tie_prob": -0.1}, {"tie_margin": -1}]
)
def test_settings_validation(kwargs):
    with pytest.raises(DataError):
        LabellerSettings(**kwargs)
