"""What `PreferencePairs` and `PreferenceImages` share: row checks, bad rows, skipping, image reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from xdpo.data.columns import display_name
from xdpo.data.fetch import ImageFetcher
from xdpo.data.schema import (
    ON_BAD_ROW,
    ORIGIN_COLUMNS,
    SCHEMAS,
    TableLocator,
    check_columns,
    undecoded_images,
)
from xdpo.data.transforms import FLIP_MODES, MIN_IMAGE_SIDE
from xdpo.data.validate import IMAGE_EXPECTED, ValidationReport, check_rows, describe_image_error
from xdpo.errors import BadRowError, ConfigError, DataError


class RowItems(torch.utils.data.Dataset):
    """Items of the usable rows of a table in xdpo's schema (`fmt`), indexed by `(index, seed)`.

    Bad rows (labels, captions, missing images; `validate.py`) are found column-wise when the object
    is made; `on_bad_row="error"` raises the first, `"skip"` leaves them out (`n_bad`, `bad_rows`), as
    do `bad_rows=` passed in. An image that fails to decode when an item is read raises with "error";
    with "skip" the item is the next row whose images decode (index + 1, + 2, ..., wrapping), and
    lists the rows it passed over in `skipped_rows`. Subclasses choose the usable rows (`_usable`)
    and build an item (`_item`).
    """

    fmt = "pairs"
    noun = "pairs"
    buckets: list[tuple[int, int]] | None = None  # data.buckets: (width, height) of each (PreferencePairs)
    bucket_of: np.ndarray | None = None  # the bucket of each usable item
    none_decodable = "no pair has two decodable images"

    def __init__(
        self,
        table: datasets.Dataset,
        *,
        resolution: int,
        flip: str,
        prompt_dropout: float,
        random_crop: bool,
        source: str,
        split: str,
        on_bad_row: str,
        bad_rows: Iterable[int],
        limit: int,
        columns: Mapping[str, str] | None,
    ) -> None:
        if flip not in FLIP_MODES:
            raise ConfigError(f"data.flip must be one of {', '.join(FLIP_MODES)}, got {flip!r}")
        if on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"data.on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
        if not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"data.resolution must be a positive integer, got {resolution!r}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ConfigError(f"data.prompt_dropout must be in [0, 1], got {prompt_dropout!r}")
        self.source = source or "preference table"
        self.columns = dict(columns or {})
        check_columns(table.column_names, self.source, self.fmt)
        keep = [*SCHEMAS[self.fmt], *(c for c in ORIGIN_COLUMNS if c in table.column_names)]
        self.table = undecoded_images(table.select_columns(keep), self.fmt)
        self.locate = TableLocator(self.table, self.source, split)
        self.fetch = ImageFetcher(source, split)
        self.resolution, self.flip, self.on_bad_row = resolution, flip, on_bad_row
        self.random_crop, self.prompt_dropout = random_crop, float(prompt_dropout)
        self.labels, bad = check_rows(self.table, self.source, self.locate, self.fmt, self.columns)
        if bad and on_bad_row == "error":
            raise ValidationReport(self.source, len(self.labels), bad=dict(sorted(bad.items()))).first_error()
        excluded = np.zeros(len(self.labels), dtype=bool)
        excluded[[r for r in (*bad, *bad_rows) if 0 <= r < len(excluded)]] = True
        self.bad_rows = np.flatnonzero(excluded)
        self.n_bad = len(self.bad_rows)
        self.rows = np.flatnonzero(self._usable(excluded))
        if limit:
            self.rows = self.rows[:limit]
        self.n_items = len(self.rows)
        self.skipped: set[int] = set()  # rows found undecodable in this process (with on_bad_row="skip")

    def _usable(self, excluded: np.ndarray) -> np.ndarray:
        return ~excluded

    def _item(self, row: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """The item of key `(index, seed)` (an int key uses seed = index), with `skipped_rows`."""
        index, seed = (key, key) if isinstance(key, int | np.integer) else key
        n = self.n_items
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} {self.noun}")
        index %= n
        passed: list[int] = []
        for step in range(n):
            row = int(self.rows[(index + step) % n])
            if row in self.skipped:
                passed.append(row)
                continue
            try:  # an item of a bucketed set is placed in its index's bucket (a substitute row too)
                item = (
                    self._item(row, seed)
                    if self.bucket_of is None
                    else self._item(row, seed, self.buckets[int(self.bucket_of[index])])
                )
            except BadRowError:
                if self.on_bad_row == "error":
                    raise
                self.skipped.add(row)
                passed.append(row)
                continue
            item["skipped_rows"] = passed
            return item
        raise DataError(f"{self.source}: {self.none_decodable} ({len(passed)} tried)")

    def _image(self, record: dict, column: str, row: int) -> Image.Image:
        try:
            return self.fetch.decode(record[column], record, row, min_side=MIN_IMAGE_SIDE)
        except Exception as e:
            raise BadRowError.at(
                self.locate(row),
                row,
                display_name(column, self.columns),
                IMAGE_EXPECTED,
                describe_image_error(e),
            ) from None
