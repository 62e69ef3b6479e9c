"""The hidden labeller: a ground-truth reward standing in for human taste, and noisy Bradley-Terry labels.

Reward of an image x for a prompt naming digit y (`hidden_reward`):

    R(x, y) = max(log p_clf(y | x), LOGP_FLOOR) + W_STYLE * clip((a(x) - STROKE_MEAN) / STROKE_STD, -STYLE_CLIP, STYLE_CLIP)

- ``p_clf`` is the logistic-regression classifier of `classifier.py` (legibility of the prompted digit);
- ``a(x)`` is the stroke area: the fraction of the image's pixels darker than mid-grey
  (ink ``1 - grey/255 > 0.5``). STROKE_MEAN / STROKE_STD are its mean / std over the real digits,
  so the style term is "how much bolder than a typical real digit", in real-digit standard deviations.

The base model imitates the real digits, so its samples score ~0 on style on average and vary by
about +-1: bolder-but-legible digits are preferred, which the base does not maximise, and the
legibility term punishes blobs. A blank page scores LOGP_FLOOR-ish legibility and -STYLE_CLIP style.

Labels for a pair (`bt_labels`), with d = R0 - R1 and the frozen `LabellerSettings`:
1. tie (label_0 = 0.5) with probability `tie_prob` when |d| < `tie_margin`;
2. otherwise label_0 ~ Bernoulli(sigmoid(d / temperature)) (Bradley-Terry),
   then flipped with probability `noise` (annotator mistakes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from xdpo.apps.digits.data import parse_digit, to_grey  # parse_digit lives in data (kept importable here)
from xdpo.errors import DataError

LOGP_FLOOR = -10.0
W_STYLE = 1.0
STYLE_CLIP = 3.0
STROKE_THRESHOLD = 0.5  # ink level counted as stroke
STROKE_MEAN = 0.312  # mean stroke area of the 1,797 real digits at 32x32
STROKE_STD = 0.038  # its standard deviation


@dataclass(frozen=True)
class LabellerSettings:
    """How the hidden annotator turns rewards into labels (see the module docstring)."""

    temperature: float = 0.5
    noise: float = 0.05
    tie_margin: float = 0.1
    tie_prob: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise DataError(f"labeller temperature must be > 0, got {self.temperature}")
        for name in ("noise", "tie_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise DataError(f"labeller {name} must be in [0, 1], got {v}")
        if self.tie_margin < 0:
            raise DataError(f"labeller tie_margin must be >= 0, got {self.tie_margin}")

    def to_dict(self) -> dict:
        return asdict(self)


def reward_constants() -> dict:
    """The reward's constants, for records next to generated data."""
    return {
        "logp_floor": LOGP_FLOOR,
        "w_style": W_STYLE,
        "style_clip": STYLE_CLIP,
        "stroke_threshold": STROKE_THRESHOLD,
        "stroke_mean": STROKE_MEAN,
        "stroke_std": STROKE_STD,
    }


def _check(images: list, prompts: list[str]) -> np.ndarray:
    if len(images) != len(prompts):
        raise DataError(f"{len(images)} images but {len(prompts)} prompts")
    return np.array([parse_digit(p) for p in prompts], dtype=np.int64)


def stroke_area(image: Image.Image | np.ndarray) -> float:
    """Fraction of pixels whose ink ``1 - grey/255`` exceeds STROKE_THRESHOLD."""
    return float(np.mean(1.0 - to_grey(image) / 255.0 > STROKE_THRESHOLD))


def style_score(images: list) -> np.ndarray:
    """``clip((stroke_area - STROKE_MEAN) / STROKE_STD, -STYLE_CLIP, STYLE_CLIP)`` per image."""
    a = np.array([stroke_area(im) for im in images], dtype=np.float64)
    return np.clip((a - STROKE_MEAN) / STROKE_STD, -STYLE_CLIP, STYLE_CLIP)


def legibility(images: list, prompts: list[str]) -> np.ndarray:
    """``max(log p_clf(prompted digit | image), LOGP_FLOOR)`` per image."""
    from xdpo.apps.digits.classifier import get_classifier

    digits = _check(images, prompts)
    if not len(images):
        return np.zeros(0)
    lp = get_classifier().log_proba(images)[np.arange(len(digits)), digits]
    return np.maximum(lp, LOGP_FLOOR)


def hidden_reward(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """The ground-truth reward R(image, prompt) of the module docstring, one float per image."""
    return legibility(images, prompts) + W_STYLE * style_score(images)


def alignment(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """1.0 where the classifier's predicted digit is the prompted digit, else 0.0."""
    from xdpo.apps.digits.classifier import get_classifier

    digits = _check(images, prompts)
    if not len(images):
        return np.zeros(0)
    return (get_classifier().predict(images) == digits).astype(np.float64)


@dataclass(frozen=True)
class Labels:
    """Sampled labels and what produced them (all arrays of the pair count)."""

    label_0: np.ndarray  # 1.0 image 0 preferred, 0.0 image 1 preferred, 0.5 tie
    tie: np.ndarray  # bool
    flipped: np.ndarray  # bool: the Bradley-Terry draw was flipped by annotator noise (never for ties)
    p_bt: np.ndarray  # sigmoid((R0 - R1) / temperature)


def bt_labels(r0: np.ndarray, r1: np.ndarray, settings: LabellerSettings, rng: np.random.Generator) -> Labels:
    """Sample Bradley-Terry labels with ties and noise (module docstring). Uses 3 uniforms per pair."""
    r0, r1 = np.asarray(r0, dtype=np.float64), np.asarray(r1, dtype=np.float64)
    d = r0 - r1
    u = rng.random((3, len(d)))
    tie = (np.abs(d) < settings.tie_margin) & (u[0] < settings.tie_prob)
    p = 1.0 / (1.0 + np.exp(-np.clip(d / settings.temperature, -500, 500)))
    bt = (u[1] < p).astype(np.float64)
    flipped = (u[2] < settings.noise) & ~tie
    label = np.where(flipped, 1.0 - bt, bt)
    label = np.where(tie, 0.5, label)
    return Labels(label_0=label, tie=tie, flipped=flipped, p_bt=p)
