"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before anything runs.

Every key is a dataclass field with a default and a one-line help text (`xdpo train --help` prints
them all). Unknown keys, wrong types and impossible values raise `ConfigError` naming the key.

- `schema.py`: the sections and their keys (ranges, choices read from registries, former names);
- `options.py`: `Option`, the keys components declare, and the sections made of them;
- `sections.py`: which sections components declare (`family`, one per objective with options);
- `parse.py`: keys, coercion, YAML and overrides, old names;
- `rules.py`: validation (each key's range, then the rules owned by the components);
- `load.py`: `load_config`; `dump.py`: config.yaml, `--help` and the table of docs/config.md.
Importing this package imports no component (and no torch): registries are read on first use.
"""

from xdpo.config.dump import dump_yaml, help_table, markdown_table, to_dict
from xdpo.config.load import from_flat, load_config
from xdpo.config.options import Option
from xdpo.config.parse import (
    all_keys,
    iter_fields,
    parse_override,
    read_file,
    rename_old_keys,
    renamed_keys,
    value_of,
)
from xdpo.config.rules import RULE_OWNERS, require, validate
from xdpo.config.schema import (
    DATA_COLUMNS,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OnlineConfig,
    ReferenceConfig,
    TimestepConfig,
    TrainConfig,
    ValidationConfig,
)

__all__ = [
    "DATA_COLUMNS",
    "RULE_OWNERS",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OnlineConfig",
    "Option",
    "ReferenceConfig",
    "TimestepConfig",
    "TrainConfig",
    "ValidationConfig",
    "all_keys",
    "dump_yaml",
    "from_flat",
    "help_table",
    "iter_fields",
    "load_config",
    "markdown_table",
    "parse_override",
    "read_file",
    "rename_old_keys",
    "renamed_keys",
    "require",
    "to_dict",
    "validate",
    "value_of",
]
