"""`load_config`: a YAML file and dotted overrides -> a typed, validated `Config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdpo.config.parse import build, parse_override, read_file
from xdpo.config.rules import validate
from xdpo.config.schema import Config


def from_flat(flat: dict[str, Any]) -> Config:
    """A validated `Config` from {dotted key: value}."""
    cfg = build(flat)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, type-check and validate."""
    flat: dict[str, Any] = read_file(path) if path is not None else {}
    for o in overrides:
        k, v = parse_override(o)
        flat[k] = v
    return from_flat(flat)
