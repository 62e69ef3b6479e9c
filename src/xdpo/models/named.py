"""Named models: the names `model.pretrained` and `--model` accept besides folders and hub ids.

A registry of name -> resolver (a function returning the pipeline folder), filled by plugins of the group
`xdpo.models` (`xdpo.plugins.load_group`), never by imports from here: the digits app registers `digits`
and `digits-flow` (`xdpo.apps.digits:register_named_models`); a third-party package registers its own
through an entry point in that group calling `register_named_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xdpo.plugins import load_group

GROUP = "xdpo.models"
NAMED_MODELS: dict[str, Callable[[], Path]] = {}


def register_named_model(name: str, resolver: Callable[[], Path]) -> None:
    """`model.pretrained=name` resolves to `resolver()` (called at each resolution, so it may build or
    check the folder, raising one clear XdpoError where it cannot)."""
    NAMED_MODELS[name] = resolver


def named_models() -> dict[str, Callable[[], Path]]:
    """Every named model, by name (the plugins loaded first)."""
    load_group(GROUP)
    return dict(NAMED_MODELS)


def resolve_named(name: str) -> Path | None:
    """The folder of the named model `name`; None where no plugin registered that name."""
    resolver = named_models().get(name)
    return None if resolver is None else Path(resolver())
