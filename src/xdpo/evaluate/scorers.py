"""Scorers: one small interface, images + prompts -> one score per image.

A scorer has `name`, `details` (model/version string, recorded beside its scores — e.g. HPSv2
v2.0 and v2.1 scores are not comparable), `__call__(images, prompts) -> np.ndarray` of shape
[len(images)] (higher is better) and optionally `batch_size`. `SCORERS` maps a name to a factory
`f(device=None) -> Scorer`: it loads its model once; the evaluator then calls it on batches.
Third-party packages can add scorers with `register_scorer` or an entry point in the group
`xdpo.scorers` (name -> factory). The field's reward models (`pickscore`, `clip`, `aesthetic`,
`imagereward` in rewards.py; `hpsv2.0`/`hpsv2.1` in hps.py, `hpsv2` = `hpsv2.0`) register here too.
Factories may take keyword options (e.g. `weights=`, a local path or hub id), passed by
`load_scorer(name, device=, **options)`; the CLI's `--weights NAME=PATH` / `NAME.PART=PATH` fill them.
Built-in and plugin scorers (the field's models, the digits world's) register through plugins.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from xdpo.errors import ConfigError, DataError, XdpoError
from xdpo.evaluate.plugins import load_plugins


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
# Other names for registered scorers; the scorer keeps its canonical name (its score column).
SCORER_ALIASES = {"hpsv2": "hpsv2.0"}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: register a scorer factory under `name`."""

    def add(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        SCORERS[name] = factory
        return factory

    return add


def available_scorers() -> dict[str, Callable[..., Scorer]]:
    """Registered scorers (plugins loaded) plus those of the `xdpo.scorers` entry-point group."""
    load_plugins()
    found = dict(SCORERS)
    for ep in entry_points(group="xdpo.scorers"):
        found.setdefault(ep.name, lambda device=None, _ep=ep, **kw: _ep.load()(device=device, **kw))  # lazy
    return found


def canonical_name(name: str) -> str:
    return SCORER_ALIASES.get(name, name)


def load_scorer(name: str, *, device: str | None = None, **options: Any) -> Scorer:
    """Instantiate one scorer by name with its factory's options; unknown names or options are listed."""
    scorers = available_scorers()
    name = canonical_name(name)
    if name not in scorers:
        available = sorted(scorers) + sorted(SCORER_ALIASES)
        raise ConfigError(f"unknown scorer {name!r} (available: {', '.join(available) or 'none'})")
    factory = scorers[name]
    if options:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in options if k not in params or k == "device"]
        if unknown and not takes_any:
            known = ", ".join(k for k in params if k != "device") or "none"
            raise ConfigError(f"scorer {name}: unknown option {unknown[0]!r} (options: {known})")
    return factory(device=device, **options)


def load_scorers(
    specs: str | Sequence[str | Scorer],
    *,
    device: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Scorer]:
    """Scorers from "a,b", a list of names, or ready Scorer objects (kept as they are).

    `options` maps a scorer name to its factory's keyword options, e.g. {"pickscore": {"weights": PATH}}.
    """
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs:
        raise ConfigError("no scorers given")
    options = {canonical_name(k): dict(v) for k, v in (options or {}).items()}
    wanted = {canonical_name(s) for s in specs if isinstance(s, str)}
    if stray := sorted(set(options) - wanted):
        raise ConfigError(f"options (--weights) for {stray[0]}, which is not among the scorers")
    scorers = [
        load_scorer(s, device=device, **options.get(canonical_name(s), {})) if isinstance(s, str) else s
        for s in specs
    ]
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ConfigError(f"scorers: a name appears twice ({', '.join(names)})")
    return scorers


def parse_weights(items: Iterable[str], known: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """`["pickscore=DIR", "pickscore.processor=DIR"]` -> {"pickscore": {"weights": DIR, "processor": DIR}}.

    NAME=PATH sets a scorer's main weights; NAME.PART=PATH one of its other parts (its options).
    """
    known = set(known if known is not None else available_scorers()) | set(SCORER_ALIASES)
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"--weights {item!r}: expected NAME=PATH or NAME.PART=PATH")
        name, part = key, "weights"
        if name not in known:
            head, _, tail = key.rpartition(".")
            if head not in known:
                raise ConfigError(f"--weights {key}: unknown scorer (available: {', '.join(sorted(known))})")
            name, part = head, tail
        out.setdefault(canonical_name(name), {})[part] = value
    return out


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
