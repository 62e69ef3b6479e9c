"""Preference data: readers of every source (parquet, save_to_disk, webdataset shards, hub, streamed),
column mapping, validation, pair and per-image transforms (PIL + numpy) and the Pick-a-Pic writer.

The names below load their modules on first use (PEP 562), so that a module needing only `xdpo.data.batch`
or `xdpo.data.encode` (the training step, the benchmarks) does not import `datasets` and pyarrow."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "open_data": "entry",
    "open_images": "entry",
    "open_pair_data": "entry",
    "PreferenceImages": "perimage",
    "collate_images": "perimage",
    "PreferencePairs": "pickapic",
    "collate_pairs": "pickapic",
    "load_preference_table": "pickapic",
    "write_pairs_parquet": "pickapic",
    "ON_BAD_ROW": "schema",
    "REQUIRED_COLUMNS": "schema",
    "row_locator": "schema",
    "MIN_IMAGE_SIDE": "transforms",
    "ValidationReport": "validate",
    "validate_pairs": "validate",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'xdpo.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xdpo.data.{_WHERE[name]}"), name)
