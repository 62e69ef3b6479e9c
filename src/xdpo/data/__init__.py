"""Preference data: readers of every source (parquet, save_to_disk, webdataset shards, hub, streamed),
column mapping, validation, pair and per-image transforms (PIL + numpy) and the Pick-a-Pic writer."""

from xdpo.data.entry import open_data, open_images, open_pair_data
from xdpo.data.perimage import PreferenceImages, collate_images
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
    "PreferenceImages",
    "PreferencePairs",
    "ValidationReport",
    "collate_images",
    "collate_pairs",
    "load_preference_table",
    "open_data",
    "open_images",
    "open_pair_data",
    "row_locator",
    "validate_pairs",
    "write_pairs_parquet",
]
