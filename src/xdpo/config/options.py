"""Keys that components declare, and the generic pieces of the typed schema (no registry, no torch).

- `Option`: one key a component declares (a family's `family.<name>`, an objective's `<objective>.<name>`):
  type, default, help, check and rule, a former name;
- `section_class(name, options, rebuild)`: the dataclass of a section made of such options (one field per
  option, cached), whose instances pickle by value (a spawned worker rebuilds them with `rebuild`);
- `names("module:attribute", *first)`: the choices of a key read from a registry on first use (the
  schema names registries by path: importing the config imports no component);
- `at_least`, `above`, `within`, ...: a single key's range as field metadata (`check` + `rule`), the
  same pair an `Option` carries, so that validation is one loop over the keys.

This module imports nothing of xdpo but its errors: the families and objectives (below the config) declare
their options with it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """A key a component declares: `<section>.<name>` (one key however many components declare it).

    `type`: what the config coerces the value to (bool, int, float, str, a Literal); `check(value)` False
    stops the run with "config key `<section>.<name>`: <rule>, got <value>"; `formerly`: the key's old
    name, still accepted with a one-line deprecation message; `cached`: the text conditions depend on it,
    so a latent/text cache records it (`Family.cache_keys`)."""

    name: str
    type: Any
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    formerly: str = ""
    cached: bool = False


def metadata(option: Option, section: str) -> dict[str, Any]:
    """The field metadata of `option` in `section`: what the parser and the validation read of any key."""
    meta: dict[str, Any] = {"help": option.help, "option": option}
    if option.check is not None:
        meta |= {"check": option.check, "rule": option.rule}
    if option.formerly:
        meta["formerly"] = option.formerly
    return meta


@functools.cache
def section_class(name: str, options: tuple[Option, ...], rebuild: Callable[[str, dict], Any]) -> type:
    """The dataclass of section `name` holding `options` (pickled as `rebuild(name, values)`)."""
    fields = [
        (o.name, o.type, dataclasses.field(default=o.default, metadata=metadata(o, name))) for o in options
    ]
    reduce = lambda self: (rebuild, (name, dataclasses.asdict(self)))  # noqa: E731 - pickles by value
    title = "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
    cls = dataclasses.make_dataclass(f"{title}Config", fields, namespace={"__reduce__": reduce})
    cls.__module__ = __name__
    return cls


def resolve(ref: str) -> Any:
    """`package.module:attribute` -> the attribute (imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def names(ref: str, *first: str) -> Callable[[], tuple[str, ...]]:
    """The choices of a key: `first`, then the names of the registry at `ref` (a mapping, or a function
    returning a mapping or names), read when the choices are needed."""

    def choices() -> tuple[str, ...]:
        found = resolve(ref)
        found = found() if callable(found) else found
        return (*first, *(found.keys() if isinstance(found, Mapping) else found))

    return choices


# ---- a single key's range: `check` and `rule` as field metadata ------------------------------------


def rule(check: Callable[[Any], bool], text: str) -> dict[str, Any]:
    return {"check": check, "rule": text}


def at_least(low: float) -> dict[str, Any]:
    return rule(lambda v: v >= low, f"must be >= {low}")


def above(low: float) -> dict[str, Any]:
    return rule(lambda v: v > low, f"must be > {low}")


def within(low: float, high: float, closed: str = "[]") -> dict[str, Any]:
    """`closed`: the interval's brackets, e.g. "[)" for low <= v < high."""
    lo_ok = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return rule(lambda v: lo_ok(v) and hi_ok(v), f"must be in {closed[0]}{low}, {high}{closed[1]}")


def required(what: str = "") -> dict[str, Any]:
    return rule(bool, f"required ({what})" if what else "required")


def key(default: Any, help: str, **kw: Any) -> Any:
    """A schema key: its default (lists and dicts copied per instance) and field metadata (`help`, and `check`,
    `rule`, `choices`, `formerly`, ... as `xdpo.config.schema` describes)."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **kw}
        )
    return dataclasses.field(default=default, metadata={"help": help, **kw})
