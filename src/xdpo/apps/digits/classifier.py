"""The labeller's digit classifier: multinomial logistic regression on 8x8 ink features.

Trained deterministically at first use on all 1,797 real digits as the world shows them (8x8 ->
32x32 image -> `data.to_ink8`), so real and generated images go through one path. Only the
coefficients are kept (numpy, no pickle): ``p(y | x) = softmax(W @ (ink8(x).ravel() / 16) + b)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from xdpo.apps.digits.data import IMAGE_SIZE, load_digit_images, to_ink8

C_REG = 1.0  # inverse L2 strength: moderate, so probabilities stay calibrated rather than all 0/1


@dataclass(frozen=True)
class DigitClassifier:
    """Softmax classifier over 64 ink features; `coef` [10, 64], `intercept` [10]."""

    coef: np.ndarray
    intercept: np.ndarray

    def log_proba_features(self, feats: np.ndarray) -> np.ndarray:
        """Log-probabilities [N, 10] from features [N, 64] (ink / 16)."""
        z = feats @ self.coef.T + self.intercept
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def log_proba(self, images: list[Image.Image] | np.ndarray) -> np.ndarray:
        """Log-probabilities [N, 10] of images (PIL or arrays, any size)."""
        return self.log_proba_features(features(images))

    def predict(self, images: list[Image.Image] | np.ndarray) -> np.ndarray:
        """Most likely digit per image."""
        return self.log_proba(images).argmax(axis=1)


def features(images: list[Image.Image] | np.ndarray) -> np.ndarray:
    """Classifier features [N, 64]: ``to_ink8(image).ravel() / 16``."""
    return np.stack([to_ink8(im).ravel() / 16.0 for im in images]).astype(np.float64)


def fit_classifier(images: list | np.ndarray, labels: np.ndarray, c: float = C_REG) -> DigitClassifier:
    """Fit the logistic regression (lbfgs, deterministic) on images and labels."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=500, tol=1e-3)
    lr.fit(features(images), labels)
    return DigitClassifier(coef=lr.coef_.copy(), intercept=lr.intercept_.copy())


@lru_cache(maxsize=1)
def get_classifier() -> DigitClassifier:
    """The labeller's classifier, fitted on all real digits at first use and cached in memory."""
    grey, y = load_digit_images(IMAGE_SIZE)
    return fit_classifier(grey, y)
