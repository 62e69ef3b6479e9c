"""The generic parser of the typed config: keys, coercion, YAML files and `key=value` overrides.

Every leaf of the schema (`schema.Config`, with the sections components declare) is a dotted key with a
type; a value is checked against it and converted (ints accepted for floats, `a,b` text for lists,
`a:b,c:d` for mappings). YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans: the parser keeps the text
they were written as, so a string-typed key (e.g. `train.mixed_precision=no`) gets that text while a
bool key gets the boolean. Unknown keys raise `ConfigError` naming the closest known key; a key's former
name (`formerly` metadata) is read under its new name with one line on stderr.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from xdpo.config.schema import Config
from xdpo.errors import ConfigError


def iter_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted key, field, resolved type) for every leaf key, the declared sections' keys included."""
    hints = typing.get_type_hints(cls)
    taken = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:  # sections named after components, at this level of the config
            for name, section in f.metadata["sections"]().items():
                if name in taken:
                    raise ConfigError(
                        f"the options of {name!r} would make a section named like `{prefix}{name}`"
                    )
                yield from iter_fields(section, f"{prefix}{name}.")
            continue
        tp = f.metadata["section"]() if "section" in f.metadata else hints[f.name]
        if "choices" in f.metadata:
            tp = Literal[f.metadata["choices"]()]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def all_keys() -> list[str]:
    return [k for k, _, _ in iter_fields()]


def value_of(cfg: Any, key: str) -> Any:
    """The value of dotted `key` in `cfg` (a section: `cfg.<name>`, the declared ones included)."""
    return functools.reduce(getattr, key.split("."), cfg)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("empty" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping name: column"
    return getattr(tp, "__name__", str(tp))


# ---- values as written -----------------------------------------------------------------------------


class Written:
    """A YAML 1.1 boolean as it was written (`no`, `off`, `yes`, `on`, `true`, ...): a bool key takes its
    value, a string-typed key (str, a Literal of strings) its text."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: bool) -> None:
        self.text, self.value = text, value

    def __repr__(self) -> str:
        return repr(self.text)

    def __str__(self) -> str:
        return self.text


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load`, except that booleans keep their text (`Written`)."""


_Loader.add_constructor(
    "tag:yaml.org,2002:bool", lambda loader, node: Written(node.value, loader.construct_yaml_bool(node))
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader


def _text(value: Any) -> Any:
    return value.text if isinstance(value, Written) else value


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against type `tp`; ints are accepted for floats. Raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key `{key}`: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, Written):
            value = value.text if value.text in typing.get_args(tp) else value.value
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ConfigError:
                pass
        raise bad
    if origin is dict:
        return _coerce_mapping(key, value, bad)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        return [coerce(key, v, typing.get_args(tp)[0]) for v in value]
    if isinstance(value, Written):
        if tp is bool:
            return value.value
        if tp is str:
            return value.text
        raise bad
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-8` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool | dict | list):
            raise bad
        return str(value)
    raise bad


def _coerce_mapping(key: str, value: Any, bad: ConfigError) -> dict[str, str]:
    """A str -> str mapping from a YAML mapping or `a:b,c:d` text (empty or null = {})."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs = [part.split(":", 1) for part in value.split(",") if part.strip()]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise ConfigError(
                f"config key `{key}`: expected NAME:COLUMN pairs separated by commas, got {value!r}"
            )
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise bad
    out = {}
    for k, v in ((_text(k), _text(v)) for k, v in value.items()):
        if isinstance(k, bool | dict | list) or isinstance(v, bool | dict | list) or k is None or v is None:
            raise ConfigError(f"config key `{key}`: expected names and columns as text, got {k!r}: {v!r}")
        out[str(k)] = str(v)
    return out


# ---- files, overrides, old names -----------------------------------------------------------------


def unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return ConfigError(f"unknown config key `{key}`{hint}")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A YAML mapping of sections -> {dotted key: value} (mapping-typed keys stay mappings)."""
    fields = list(iter_fields())
    sections = {k.split(".")[0] for k, _, _ in fields if "." in k}
    mappings = {k for k, _, tp in fields if typing.get_origin(tp) is dict}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not prefix and key in sections:
            if not isinstance(v, dict):
                raise ConfigError(f"config key `{key}`: expected a section of keys, got {v!r}")
            out.update(flatten(v, key + "."))
        elif isinstance(v, dict) and key not in mappings:
            raise unknown(key)
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`loss.beta=1000` -> ("loss.beta", 1000); the value is read as YAML (`a,b` lists allowed)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected KEY=VALUE, e.g. loss.beta=1000")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's keys, flattened."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = read_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p}: expected a mapping of keys at the top level")
    return flatten(raw)


def renamed_keys() -> dict[str, str]:
    """Old config key -> its new name (a field's or a declared option's `formerly`)."""
    return {f.metadata["formerly"]: key for key, f, _ in iter_fields() if f.metadata.get("formerly")}


def rename_old_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """`flat` with old keys under their new names (a later setting of either name wins, as for any key set
    twice), one line on stderr for each old key."""
    renamed, out = renamed_keys(), {}
    for key, value in flat.items():
        if key in renamed:
            print(f"xdpo: config key `{key}` is deprecated; use `{renamed[key]}`", file=sys.stderr)
            key = renamed[key]
        out.pop(key, None)
        out[key] = value
    return out


def build(flat: dict[str, Any]) -> Config:
    """A `Config` holding `flat`'s values, type-checked (not yet validated: `rules.validate`)."""
    types_by_key = {k: tp for k, _, tp in iter_fields()}
    cfg = Config()
    for key, value in rename_old_keys(flat).items():
        if key not in types_by_key:
            raise unknown(key)
        section, _, name = key.rpartition(".")
        setattr(value_of(cfg, section) if section else cfg, name, coerce(key, value, types_by_key[key]))
    return cfg
