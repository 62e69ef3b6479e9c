"""The config written out: as a dict and YAML (a run's config.yaml, read back by `load_config`), and the
key list (`xdpo train --help`, and the table of keys in docs/config.md: `markdown_table`, which
`xdpo.config.key_page` writes there)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from xdpo.config.parse import iter_fields, type_name
from xdpo.config.schema import Config


def to_dict(cfg: Config) -> dict[str, Any]:
    """Sections as nested dicts; the sections components declare (`Config.sections`) at the top level."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if "sections" in f.metadata:
            out.update(out.pop(f.name))
    return out


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_table() -> str:
    """Every key with its type, default and help (for `xdpo train --help`)."""
    rows = []
    for key, f, tp in iter_fields():
        rows.append(f"  {key:<28} {type_name(tp):<40} default {_default(f)!r}\n      {f.metadata['help']}")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = ",".join(f"{k}:{v}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """docs/config.md's table of configuration keys (key, type, default, meaning), one row per key."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, f, tp in iter_fields():
        rows.append(
            f"| `{key}` | {_cell(type_name(tp))} | {_cell(_default(f))} | {_cell(f.metadata['help'])} |"
        )
    return "\n".join(rows)
