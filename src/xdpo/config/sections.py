"""The sections components declare, read from their registries on first use (never at import).

- `family`: every family's options (`xdpo.models.families.family_options`: one key per name, each
  family's checks applied by `xdpo.models.families.check_config`);
- one section per objective that declares options (`Objective.options`), named after the objective:
  `mapo.margin_weight` is option `margin_weight` of objective `mapo`.
A section's class is made again when a registration changes its options (`options.section_class` caches
it per option tuple), so a family or objective registered later (a plugin, a test) brings its keys.
"""

from __future__ import annotations

from typing import Any

from xdpo.config.options import section_class


def family_section() -> type:
    """The `family` section's dataclass for the families registered now."""
    from xdpo.models.families import family_options

    return section_class("family", family_options(), rebuild)


def objective_sections() -> dict[str, type]:
    """Objective name -> the dataclass of its section, for every registered objective with options."""
    from xdpo.objectives import OBJECTIVES

    return {name: section_class(name, o.options, rebuild) for name, o in OBJECTIVES.items() if o.options}


def rebuild(name: str, values: dict[str, Any]) -> Any:
    """Section `name` holding `values` (how a pickled one is rebuilt, e.g. in a spawned worker)."""
    cls = family_section() if name == "family" else objective_sections()[name]
    return cls(**values)
