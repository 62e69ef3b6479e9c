"""`data.columns`: read a dataset under its own column names (chosen/rejected, prompt, image, ...).

The mapping goes from xdpo's names (`caption`, `jpg_0`, `jpg_1`, `label_0` for pairs; `image`, `caption`,
`label` for per-image data) to the dataset's columns; unmapped names are looked up as they are. Pairs
without a `label_0` column, mapped or not, are chosen/rejected data: `jpg_0` is the preferred image
(label_0 = 1 on every row); per-image data without a `label` column are winner-only data: every image is
preferred (label = 1 on every row; SePPO trains on such a table). Bad rows are reported under the dataset's own column names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets

from xdpo.data.schema import LABEL_COLUMN, ORIGIN_COLUMNS, SCHEMAS
from xdpo.errors import ConfigError, DataError


def describe(columns: Mapping[str, str] | None) -> str:
    """`caption:prompt,jpg_0:chosen` as written on the command line."""
    return ",".join(f"{k}:{v}" for k, v in (columns or {}).items())


def display_name(column: str, columns: Mapping[str, str] | None) -> str:
    """How a bad row names a column: the dataset's own name, with xdpo's in parentheses when mapped."""
    own = (columns or {}).get(column, column)
    return column if own == column else f"{own} ({column})"


def check_mapping(columns: Mapping[str, str] | None, fmt: str = "pairs") -> dict[str, str]:
    """The mapping, checked: known names, no dataset column used twice."""
    columns = dict(columns or {})
    names = SCHEMAS[fmt]
    unknown = sorted(set(columns) - set(names))
    if unknown:
        raise ConfigError(
            f"data.columns: unknown name(s) {', '.join(unknown)}; with data.format={fmt} it maps "
            f"{', '.join(names)} to the dataset's columns"
        )
    used: dict[str, str] = {}
    for name in names:
        own = columns.get(name, name)
        if own in used:
            raise ConfigError(
                f"data.columns: {used[own]} and {name} both read column {own!r} ({describe(columns)})"
            )
        used[own] = name
    return columns


def missing_columns(
    names: Sequence[str], columns: Mapping[str, str] | None, source: str, fmt: str = "pairs"
) -> None:
    """DataError naming the dataset columns the mapping asks for and the data lack (every row lacks them)."""
    columns = check_mapping(columns, fmt)
    present = set(names)
    mapped = [f"{columns[n]} (data.columns {n}:{columns[n]})" for n in SCHEMAS[fmt] if n in columns]
    lacking = [columns[n] for n in SCHEMAS[fmt] if n in columns and columns[n] not in present]
    if lacking:
        found = ", ".join(n for n in names if n not in ORIGIN_COLUMNS) or "none"
        raise DataError(
            f"{source}: missing column(s) {', '.join(lacking)} named by data.columns={describe(columns)} "
            f"(mapped: {'; '.join(mapped)}; found: {found})"
        )


def apply_columns(
    table: datasets.Dataset, columns: Mapping[str, str] | None, source: str, fmt: str = "pairs"
) -> datasets.Dataset:
    """`table` with its columns renamed to xdpo's names (and label_0 = 1 for chosen/rejected pairs, label = 1
    for winner-only images).

    Without a mapping the table is returned as it is when it already has every column."""
    columns = check_mapping(columns, fmt)
    missing_columns(table.column_names, columns, source, fmt)
    names = SCHEMAS[fmt]
    rename = {columns[n]: n for n in names if n in columns and columns[n] != n}
    if rename:
        clash = [c for c in table.column_names if c in rename.values() and c not in rename]
        table = table.remove_columns(clash).rename_columns(rename)
    label = LABEL_COLUMN[fmt]
    if label not in table.column_names and label not in columns:
        if fmt == "images":
            print(winner_only_notice(source), flush=True)
        table = table.add_column(label, [1.0] * len(table))
    return table


def winner_only_notice(source: str) -> str:
    """The line a per-image table without labels prints: its every image is taken as preferred (right for
    SePPO's winner-only data; for KTO it means no undesirable image, so say it where the user sees it)."""
    return (
        f"data: {source} has no `label` column: every image is taken as preferred (label 1); "
        "map a label column with data.columns=label:COLUMN if it has one"
    )
