"""Reward specs (`xdpo pairs --scorer`, `online.scorer`): a scorer name, a weighted sum, or a plugin function.

- `pickscore` — any registered scorer (`xdpo evaluate`'s: pickscore, hpsv2, imagereward, clip, aesthetic,
  digits-reward, ... and plugins);
- `pickscore:1,aesthetic:0.5` — the weighted sum of several (a bare name has weight 1);
- `mymodule:myfunction` (or `mymodule:myfunction:0.5` in a sum) — a Python function `f(images: list[PIL.Image], prompts: list[str]) -> list[float]`
  importable from the current directory or PYTHONPATH (a `module:name` whose name is not a number).
`Reward.parts_scores` gives each part's raw scores (one column per part), which the rollout engine
normalises per reward before combining (`xdpo.rollout.advantages`); `Reward.__call__` is their weighted sum.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.errors import ConfigError


@dataclass
class Reward:
    """A combined reward: sum_i w_i * score_i(images, prompts), in batches."""

    spec: str
    parts: list[tuple[float, Callable[[list, list[str]], Any], str]]
    batch_size: int = 32

    def parts_scores(self, images: list, prompts: list[str]) -> np.ndarray:
        """[n images, n parts] raw scores (float64), unweighted; one clear line for a bad scorer."""
        cols = []
        for _, fn, name in self.parts:
            got = []
            for i in range(0, len(images), self.batch_size):
                got.append(
                    np.asarray(fn(images[i : i + self.batch_size], prompts[i : i + self.batch_size]), float)
                )
            scores = np.concatenate(got).reshape(-1) if got else np.zeros(0)
            if scores.shape[0] != len(images) or not np.isfinite(scores).all():
                raise ConfigError(
                    f"scorer {name}: expected one finite score per image ({len(images)}), got {scores.shape[0]}"
                    + ("" if np.isfinite(scores).all() else " with non-finite values")
                )
            cols.append(scores)
        return np.stack(cols, axis=1) if cols else np.zeros((len(images), 0))

    @property
    def weights(self) -> np.ndarray:
        return np.array([w for w, _, _ in self.parts], dtype=np.float64)

    @property
    def names(self) -> list[str]:
        return [name for _, _, name in self.parts]

    def __call__(self, images: list, prompts: list[str]) -> np.ndarray:
        return combine(self.parts_scores(images, prompts), self.weights)

    @property
    def details(self) -> str:
        return " + ".join(f"{w:g} x {name}" for w, _, name in self.parts)


def as_reward(reward: Any) -> Reward:
    """`reward` as a `Reward`: itself, or a plain function f(images, prompts) -> scores as its one part."""
    if isinstance(reward, Reward):
        return reward
    return Reward(
        getattr(reward, "__name__", "reward"), [(1.0, reward, getattr(reward, "__name__", "reward"))]
    )


def combine(raw: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_j w_j raw[:, j], part by part from zero (float64)."""
    total = np.zeros(raw.shape[0], dtype=np.float64)
    for j, w in enumerate(weights):
        total += w * raw[:, j]
    return total


def _plugin(module: str, function: str) -> Callable[[list, list[str]], Any]:
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"scorer {module}:{function}: cannot import it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"scorer {module}:{function} is not a function")
    return fn


def _weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_reward(
    spec: str, *, device: str | None = None, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Reward:
    """Parse `spec` (module docstring) and load each scorer once."""
    from xdpo.evaluate.scorers import load_scorer

    parts = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        head, sep, tail = item.rpartition(":")
        name, weight = (head, _weight(tail)) if sep and _weight(tail) is not None else (item, 1.0)
        if ":" in name:  # module:function[:weight]
            module, _, function = name.rpartition(":")
            parts.append((weight, _plugin(module, function), name))
            continue
        scorer = load_scorer(name, device=device, **(options or {}).get(name, {}))
        parts.append((weight, scorer, f"{scorer.name}" + (f" ({scorer.details})" if scorer.details else "")))
    if not parts:
        raise ConfigError(f"scorer: empty spec {spec!r} (e.g. pickscore, or pickscore:1,aesthetic:0.5)")
    return Reward(spec, parts)
