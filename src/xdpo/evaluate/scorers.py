"""Scorers: one small interface, images + prompts -> one score per image.

A scorer has `name`, `details` (model/version string, recorded beside its scores — e.g. HPSv2
v2.0 and v2.1 scores are not comparable), `__call__(images, prompts) -> np.ndarray` of shape
[len(images)] (higher is better) and optionally `batch_size`. `SCORERS` maps a name to a factory
`f(device=None) -> Scorer`: it loads its model once; the evaluator then calls it on batches.
Third-party packages can add scorers with `register_scorer` or an entry point in the group
`xdpo.scorers` (name -> factory). PickScore, HPSv2, ImageReward, CLIP and the aesthetic
predictor come later through this interface.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from xdpo.errors import ConfigError, DataError, XdpoError


@runtime_checkable
class Scorer(Protocol):
    name: str
    details: str

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray: ...


@dataclass
class FunctionScorer:
    """A scorer made from a plain function `fn(images, prompts) -> array`."""

    name: str
    fn: Callable[[list[Image.Image], list[str]], np.ndarray]
    details: str = ""
    batch_size: int = 64

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return np.asarray(self.fn(images, prompts), dtype=np.float64).reshape(-1)


SCORERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: register a scorer factory under `name`."""

    def add(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        SCORERS[name] = factory
        return factory

    return add


def available_scorers() -> dict[str, Callable[..., Scorer]]:
    """Built-in scorers plus those installed through the `xdpo.scorers` entry-point group."""
    found = dict(SCORERS)
    for ep in entry_points(group="xdpo.scorers"):
        found.setdefault(ep.name, lambda device=None, _ep=ep: _ep.load()(device=device))  # lazy
    return found


def load_scorer(name: str, *, device: str | None = None) -> Scorer:
    """Instantiate one scorer by name; an unknown name lists the available ones."""
    scorers = available_scorers()
    if name not in scorers:
        raise ConfigError(f"unknown scorer {name!r} (available: {', '.join(sorted(scorers)) or 'none'})")
    return scorers[name](device=device)


def load_scorers(specs: str | Sequence[str | Scorer], *, device: str | None = None) -> list[Scorer]:
    """Scorers from "a,b", a list of names, or ready Scorer objects (kept as they are)."""
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs:
        raise ConfigError("no scorers given")
    scorers = [load_scorer(s, device=device) if isinstance(s, str) else s for s in specs]
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ConfigError(f"scorers: a name appears twice ({', '.join(names)})")
    return scorers


def run_scorer(
    scorer: Scorer, images: list[Image.Image], prompts: list[str], *, where: str = ""
) -> np.ndarray:
    """Call a scorer and check it returns one finite score per image."""
    try:
        scores = np.asarray(scorer(images, prompts), dtype=np.float64).reshape(-1)
    except XdpoError as e:  # e.g. a prompt the scorer cannot read: say where
        raise type(e)(f"scorer {scorer.name} {where}: {e}") from None
    if scores.shape[0] != len(images):
        raise DataError(f"scorer {scorer.name}: {scores.shape[0]} scores for {len(images)} images {where}")
    return scores


# --- digits world ----------------------------------------------------------------------------


def _digits_details(fn_name: str) -> str:
    """Function, xdpo version and a hash of the reward constants (a change invalidates cached scores)."""
    from xdpo import __version__
    from xdpo.digits import labeller

    constants = getattr(labeller, "reward_constants", dict)()
    digest = hashlib.sha1(json.dumps(constants, sort_keys=True).encode()).hexdigest()[:8]
    return f"xdpo.digits.labeller.{fn_name} (xdpo {__version__}, reward constants {digest})"


@register_scorer("digits-reward")
def digits_reward(device: str | None = None) -> Scorer:
    """The digits world's hidden ground-truth reward (the stand-in for human taste)."""
    from xdpo.digits.labeller import hidden_reward

    return FunctionScorer("digits-reward", hidden_reward, _digits_details("hidden_reward"), batch_size=256)


@register_scorer("digits-alignment")
def digits_alignment(device: str | None = None) -> Scorer:
    """1 if the digit classifier reads the prompted digit, else 0 (the digits analogue of CLIP score)."""
    from xdpo.digits.labeller import alignment

    return FunctionScorer("digits-alignment", alignment, _digits_details("alignment"), batch_size=256)
