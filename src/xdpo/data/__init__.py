"""Preference data: the Pick-a-Pic v2 schema reader, pair transforms (PIL + numpy) and writer."""

from xdpo.data.pickapic import (
    REQUIRED_COLUMNS,
    PreferencePairs,
    collate_pairs,
    load_preference_table,
    write_pairs_parquet,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "PreferencePairs",
    "collate_pairs",
    "load_preference_table",
    "write_pairs_parquet",
]
