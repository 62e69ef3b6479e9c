"""Validation: each key's own range (its `check`/`rule` metadata), then the rules across keys, each kept
next to the component it constrains and reached by name (`RULE_OWNERS`), so the config imports no
component above it: a rule owner is a function `check(cfg)` raising one `ConfigError` line.
"""

from __future__ import annotations

from typing import Any

from xdpo.config.options import resolve
from xdpo.config.parse import iter_fields, value_of
from xdpo.errors import ConfigError

RULE_OWNERS = (
    "xdpo.data.rules:check",  # columns per format, the cache, streaming, crops
    "xdpo.models.families:check_config",  # each family's checks of its keys; data.resolution
    "xdpo.models.lora:check",  # adapters and quantised bases
    "xdpo.train.rules:check",  # the data source (data.path, online, cache), the reference, the objective
    "xdpo.train.validation:check",  # validation: a held-out scorer to stop on, text encoders
)
"""The components' rules across keys, called in this order after every key's own check."""


def require(ok: bool, key: str, what: str, value: Any) -> None:
    """One line naming `key` when `ok` is false: "config key `key`: what, got value"."""
    if not ok:
        raise ConfigError(f"config key `{key}`: {what}, got {value!r}")


def check_keys(cfg: Any) -> None:
    """Every key's own range: its field's (or declared option's) `check`, broken -> its `rule`."""
    for key, f, _ in iter_fields(type(cfg)):
        check = f.metadata.get("check")
        if check is not None:
            value = value_of(cfg, key)
            require(check(value), key, f.metadata["rule"], value)


def validate(cfg: Any) -> None:
    """Value checks beyond types: each key's range, then the components' rules across keys."""
    check_keys(cfg)
    for owner in RULE_OWNERS:
        resolve(owner)(cfg)
