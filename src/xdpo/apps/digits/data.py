"""Digits-world data: real images from `sklearn.datasets.load_digits` and their captions.

Images are black ink on white paper, RGB with the grey value replicated, upsampled from the 8x8
originals (ink 0..16) with PIL bicubic: ``grey = 255 * (1 - clip(up(ink / 16), 0, 1))``.
The inverse used on any image (real or generated) is `to_ink8`: greyscale, area-average down to
8x8, ``ink = 16 * (1 - grey / 255)`` -- the classifier sees both kinds through this same path.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

import numpy as np
from PIL import Image

from xdpo.errors import DataError

IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NUMERALS = {str(d): d for d in range(10)}
_WORDS = {w: d for d, w in enumerate(DIGIT_WORDS)}

# Training phrasings: "{w}" is the word (seven), "{d}" the numeral (7). "a handwritten digit seven"
# is the canonical one. Held-out phrasings reuse the digit tokens in templates never trained on.
TRAIN_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {w}",
    "a picture of the digit {d}",
    "handwritten {w}",
    "the digit {d}, written by hand",
    "a scan of a handwritten {w}",
)
EVAL_TEMPLATES = (
    "an image of the number {w}",
    "a drawing of the digit {d}",
)
CANONICAL_TEMPLATE = TRAIN_TEMPLATES[0]


def caption(digit: int, template: str = CANONICAL_TEMPLATE) -> str:
    """The caption of `digit` in one phrasing, e.g. ``caption(7) == "a handwritten digit seven"``."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return template.format(w=DIGIT_WORDS[int(digit)], d=int(digit))


def train_prompts() -> list[str]:
    """All training captions: every training phrasing x every digit (60 prompts)."""
    return [caption(d, t) for t, d in itertools.product(TRAIN_TEMPLATES, range(10))]


def eval_prompts() -> list[str]:
    """Held-out evaluation captions: phrasings never seen in training x every digit (20 prompts)."""
    return [caption(d, t) for t, d in itertools.product(EVAL_TEMPLATES, range(10))]


def parse_digit(prompt: str) -> int:
    """The digit a caption names, as a word ("seven") or a numeral ("7"); DataError if none or several."""
    found = set()
    for tok in words(prompt):
        if tok in _WORDS:
            found.add(_WORDS[tok])
        elif tok in _NUMERALS:
            found.add(_NUMERALS[tok])
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise DataError(f"prompt {prompt!r} names {what}; expected exactly one of 0-9 or zero-nine")
    return found.pop()


def prompt_digits(prompts: list[str]) -> np.ndarray:
    """Digit named by each caption (`parse_digit`)."""
    return np.array([parse_digit(p) for p in prompts], dtype=np.int64)


@lru_cache(maxsize=1)
def load_digits8() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real digits: ink images [N, 8, 8] float32 in 0..16 and labels [N] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def ink8_to_grey(ink8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Upsample 8x8 ink (0..16) to a grey image [size, size] uint8, black ink on white."""
    img = Image.fromarray((ink8 / 16.0).astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
    return np.round(255.0 * (1.0 - np.clip(np.asarray(img), 0.0, 1.0))).astype(np.uint8)


@lru_cache(maxsize=4)
def _digit_array(size: int) -> np.ndarray:
    ink, _ = load_digits8()
    return np.stack([ink8_to_grey(x, size) for x in ink])


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Real digits as grey uint8 arrays [N, size, size] (black on white) and labels [N]."""
    return _digit_array(size).copy(), load_digits8()[1].copy()


def grey_to_pil(grey: np.ndarray) -> Image.Image:
    """A grey uint8 [H, W] array as an RGB PIL image (grey replicated)."""
    return Image.fromarray(np.asarray(grey, dtype=np.uint8), mode="L").convert("RGB")


def load_digit_pils(size: int = IMAGE_SIZE) -> tuple[list[Image.Image], np.ndarray]:
    """Real digits as RGB PIL images and labels."""
    grey, y = load_digit_images(size)
    return [grey_to_pil(g) for g in grey], y


def to_grey(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any image (PIL, or array HxW / HxWxC in uint8 0..255) -> float32 grey [H, W] in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float32)
    a = np.asarray(image, dtype=np.float32)
    return a.mean(axis=-1) if a.ndim == 3 else a


def to_ink8(image: Image.Image | np.ndarray) -> np.ndarray:
    """Image -> 8x8 ink (0..16, float32) by area averaging: the classifier's view of any image."""
    grey = Image.fromarray(to_grey(image), mode="F").resize((8, 8), Image.BOX)
    return (16.0 * (1.0 - np.clip(np.asarray(grey, dtype=np.float32), 0, 255) / 255.0)).astype(np.float32)


def ink_mass(image: Image.Image | np.ndarray) -> float:
    """Mean ink of the full-resolution image in 0..1: ``mean(1 - grey / 255)``."""
    return float(np.mean(1.0 - to_grey(image) / 255.0))


_WORDS_RE = re.compile(r"[a-z]+|\d+")


def words(text: str) -> list[str]:
    """Lower-case word and number tokens of a caption."""
    return _WORDS_RE.findall(text.lower())
