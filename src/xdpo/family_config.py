"""The config's `family` section and `model.family`'s choices, both read from the family registry.

Each family declares its knobs (`xdpo.models.families.Option`: type, default, help, check); the section
is a dataclass with one field per knob name, made on first use (the registry loads the families then,
never when `xdpo.config` is imported) and again when `register_family` adds options. Keys that moved
here from `model` (an option's `formerly`) are still read, with one deprecation line naming the new key.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

from xdpo.errors import ConfigError


def family_choices() -> tuple[str, ...]:
    """`model.family`'s values: auto or a registered family."""
    from xdpo.models.families import family_names

    return ("auto", *family_names())


def family_section() -> type:
    """The `family` section's dataclass for the families registered now."""
    from xdpo.models.families import family_options

    return _section_class(family_options())


@functools.cache
def _section_class(options: tuple[Any, ...]) -> type:
    fields = [
        (o.name, o.type, dataclasses.field(default=o.default, metadata={"help": o.help, "option": o}))
        for o in options
    ]
    reduce = lambda self: (_section_of, (dataclasses.asdict(self),))  # noqa: E731 - pickles by value
    cls = dataclasses.make_dataclass("FamilyConfig", fields, namespace={"__reduce__": reduce})
    cls.__module__ = __name__
    return cls


def _section_of(values: dict[str, Any]) -> Any:
    """A `family` section holding `values` (how a pickled one is rebuilt, e.g. in a spawned worker)."""
    return family_section()(**values)


def renamed_keys() -> dict[str, str]:
    """Old config key -> its new name (the families' options that moved out of `model`)."""
    from xdpo.models.families import family_options

    return {o.formerly: f"family.{o.name}" for o in family_options() if o.formerly}


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


def validate_family(cfg: Any) -> None:
    """Each family's checks of its `family.*` keys (`data.resolution` is checked against the family and its
    VAE once the model is found: `Family.check_resolution`)."""
    from xdpo.models.families import families

    for fam in families().values():
        for o in fam.options:
            value = getattr(cfg.family, o.name)
            if o.check is not None and not o.check(value):
                raise ConfigError(f"config key `family.{o.name}`: {o.rule}, got {value!r}")
