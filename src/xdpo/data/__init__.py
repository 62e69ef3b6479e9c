"""Preference data: the Pick-a-Pic v2 schema reader, validation, pair transforms (PIL + numpy) and writer."""

from xdpo.data.pickapic import (
    PreferencePairs,
    collate_pairs,
    load_preference_table,
    write_pairs_parquet,
)
from xdpo.data.schema import ON_BAD_ROW, REQUIRED_COLUMNS, row_locator
from xdpo.data.transforms import MIN_IMAGE_SIDE
from xdpo.data.validate import ValidationReport, validate_pairs

__all__ = [
    "MIN_IMAGE_SIDE",
    "ON_BAD_ROW",
    "REQUIRED_COLUMNS",
    "PreferencePairs",
    "ValidationReport",
    "collate_pairs",
    "load_preference_table",
    "row_locator",
    "validate_pairs",
    "write_pairs_parquet",
]
