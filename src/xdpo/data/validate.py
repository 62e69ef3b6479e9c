"""Up-front validation of preference data: bad rows and repeated rows, in one pass, images optional.

A row is bad when (column: what is expected)
- `label_0`: 0, 0.5 or 1 (a number, a boolean or text such as "1.0"; null, NaN, 2, 0.7, "yes" are bad);
  per-image data (`data.format=images`): `label` 0 or 1;
- `caption`: non-empty text (null, "", "   " or a non-string are bad);
- `jpg_0` / `jpg_1` (per-image data: `image`): an encoded image of at least `MIN_IMAGE_SIDE` (8)
  pixels on a side. Without decoding, only a missing (null or empty) image is found; `decode_images=True`
  decodes every image of every row (slow: the whole data set is read) and also finds undecodable,
  tiny and, for file paths, absent ones.
A missing column is never a bad row: it stops the run (`schema.check_columns`).
Repeated rows (the caption and the two images of an earlier row, in either order) are counted and
reported, never bad: a repeated comparison is valid preference data (it weights that comparison),
and dropping it would change the labels' distribution. Images are identified by `image_0_uid` /
`image_1_uid` when the table has them, else by a hash of their bytes, their path or their place in a
tar shard (`duplicates=False` skips this). Rows are named by file and row, or by tar shard and
sample key (`schema.TableLocator`); columns by the data's own names (`data.columns`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdpo.data.columns import display_name
from xdpo.data.schema import (
    IMAGE_COLUMNS_OF,
    LABEL_COLUMN,
    ON_BAD_ROW,
    ORIGIN_COLUMNS,
    SCHEMAS,
    UID_COLUMNS,
    VALID_LABELS_OF,
    TableLocator,
    as_label,
    check_columns,
    undecoded_images,
)
from xdpo.data.transforms import MIN_IMAGE_SIDE, decode_image
from xdpo.errors import BadRowError, ConfigError, DataError

LABEL_EXPECTED = "0, 0.5 or 1"
IMAGE_LABEL_EXPECTED = "1 (desirable) or 0 (undesirable)"
CAPTION_EXPECTED = "a non-empty caption (text)"
IMAGE_EXPECTED = f"an encoded image (JPEG, PNG, ...) of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels"
BATCH_ROWS = 4096
LISTED = 5


@dataclass
class ValidationReport:
    """What `validate_pairs` found. `bad` maps a bad row to its first problem (in row order)."""

    source: str
    n_rows: int
    n_ties: int = 0
    bad: dict[int, BadRowError] = field(default_factory=dict)
    n_duplicates: int = 0
    duplicate_rows: list[int] = field(default_factory=list)  # the first LISTED rows repeating an earlier one
    images_decoded: bool = False

    @property
    def bad_rows(self) -> list[int]:
        return sorted(self.bad)

    @property
    def ok(self) -> bool:
        return not self.bad

    def first_error(self) -> BadRowError:
        """The first bad row's error, noting how many rows are bad in all."""
        row = self.bad_rows[0]
        first = self.bad[row]
        more = (
            f" ({len(self.bad)} bad rows in all; data.on_bad_row=skip leaves them out)"
            if len(self.bad) > 1
            else " (data.on_bad_row=skip leaves such rows out)"
        )
        return BadRowError(str(first) + more, row=row, column=first.column)

    def summary(self) -> str:
        """A few lines for the console: rows, ties, bad rows by column with their first row numbers, repeats."""
        lines = [f"{self.source}: {self.n_rows} rows, {self.n_ties} ties"]
        if self.bad:
            by_column: dict[str, list[int]] = {}
            for row in self.bad_rows:
                by_column.setdefault(self.bad[row].column, []).append(row)
            parts = [f"{c}: {len(r)} (rows {_rows(r)})" for c, r in by_column.items()]
            lines.append(f"  {len(self.bad)} bad rows left out ({'; '.join(parts)})")
        if self.n_duplicates:
            lines.append(
                f"  {self.n_duplicates} rows repeat an earlier row's caption and images (kept; rows "
                f"{_rows(self.duplicate_rows, self.n_duplicates)})"
            )
        if not self.images_decoded:
            lines.append("  images not decoded: undecodable or tiny images are found when a step reads them")
        return "\n".join(lines)


def _rows(rows: list[int], total: int | None = None) -> str:
    total = len(rows) if total is None else total
    return ", ".join(map(str, rows[:LISTED])) + (", ..." if total > LISTED else "")


def validate_pairs(
    table: datasets.Dataset,
    *,
    source: str = "",
    split: str = "train",
    on_bad_row: str = "error",
    decode_images: bool = False,
    duplicates: bool = True,
    progress: bool = False,
    fmt: str = "pairs",
    columns: Mapping[str, str] | None = None,
) -> ValidationReport:
    """Check every row of a table in xdpo's schema (module docstring); raise or report.

    `on_bad_row="error"`: raise the first bad row's `BadRowError` (one line naming file, row, column
    and what was expected, and how many rows are bad). `"skip"`: return the report; pass
    `report.bad_rows` to `PreferencePairs(bad_rows=...)` to leave them out. `fmt="images"` checks
    per-image data (`image`, `caption`, `label` 0 or 1); `columns` (data.columns) names the data's own
    columns in the messages.
    """
    from xdpo.data.fetch import ImageFetcher

    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"data.on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    source = source or "preference table"
    check_columns(table.column_names, source, fmt)
    locate = TableLocator(table, source, split)
    fetch = ImageFetcher(source, split)
    image_columns = list(IMAGE_COLUMNS_OF[fmt])
    uids = [c for c in UID_COLUMNS if c in table.column_names] if fmt == "pairs" else []
    origin = [c for c in ORIGIN_COLUMNS if c in table.column_names]
    keep = list(SCHEMAS[fmt]) + (uids if len(uids) == 2 else []) + origin
    table = undecoded_images(table.select_columns(keep), fmt)
    labels, bad = check_rows(table, source, locate, fmt, columns)
    report = ValidationReport(source=source, n_rows=len(table), n_ties=int(np.sum(labels == 0.5)), bad=bad)
    use_uids = len(uids) == 2
    ids = uids if use_uids else image_columns
    read = (
        list(dict.fromkeys([*SCHEMAS[fmt], *ids, *origin])) if decode_images else ["caption", *ids, *origin]
    )
    seen: set[bytes] = set()  # 16-byte digests of (caption, image, image): ~100 bytes a row
    batches = _batches(table.select_columns(read), progress) if decode_images or duplicates else ()
    for start, batch in batches:
        for i, rec in enumerate(batch.to_pylist()):
            row = start + i
            if decode_images and row not in report.bad:
                for column in image_columns:
                    problem = image_problem(rec[column], lambda v, rec=rec, row=row: fetch(v, rec, row))
                    if problem:
                        name = display_name(column, columns)
                        report.bad[row] = BadRowError.at(locate(row), row, name, IMAGE_EXPECTED, problem)
                        break
            if duplicates and row not in report.bad:
                images = sorted(_identity(rec, c, use_uids) for c in ids)
                key = hashlib.blake2b("\0".join([rec["caption"], *images]).encode(), digest_size=16).digest()
                if key in seen:
                    report.n_duplicates += 1
                    if len(report.duplicate_rows) < LISTED:
                        report.duplicate_rows.append(row)
                else:
                    seen.add(key)
    report.bad = dict(sorted(report.bad.items()))
    report.images_decoded = decode_images
    if report.bad and on_bad_row == "error":
        raise report.first_error()
    return report


def _batches(table: datasets.Dataset, progress: bool) -> Iterator[tuple[int, pa.Table]]:
    """(first row, arrow batch of BATCH_ROWS rows) over the table."""
    from tqdm.auto import tqdm

    arrow = table.with_format("arrow")
    for start in tqdm(
        range(0, len(table), BATCH_ROWS), desc="validating pairs", unit="batch", disable=not progress
    ):
        yield start, arrow[start : start + BATCH_ROWS]


def _identity(rec: dict[str, Any], column: str, use_uids: bool) -> str:
    """An image's identity: its uid, else a hash of its bytes (its path, or its place in a tar shard)."""
    if use_uids:
        return str(rec[column])
    value = rec[column]
    if isinstance(value, dict) and "offset" in value:
        return f"tar:{rec.get('__url__')}:{value['offset']}"
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return "path:" + value
    return hashlib.blake2b(value or b"", digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------------------- rows


def check_rows(
    table: datasets.Dataset,
    source: str,
    locate: Callable[[int], str],
    fmt: str = "pairs",
    columns: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, dict[int, BadRowError]]:
    """The label column as float64 and the rows with a bad label, caption or missing image, column-wise.

    Labels may be numbers, booleans or text such as "1.0" (webdataset members, csv); a label column of
    another type raises DataError (every row would be bad). `columns` (data.columns) names the data's
    own columns in the messages."""
    bad: dict[int, BadRowError] = {}
    label_col, valid = LABEL_COLUMN[fmt], VALID_LABELS_OF[fmt]
    expected_label = LABEL_EXPECTED if fmt == "pairs" else IMAGE_LABEL_EXPECTED

    def mark(mask: np.ndarray, column: str, expected: str, got: Callable[[int], str]) -> None:
        name = display_name(column, columns)
        for row in np.flatnonzero(mask):
            bad.setdefault(
                int(row), BadRowError.at(locate(int(row)), int(row), name, expected, got(int(row)))
            )

    column = table.select_columns([label_col]).with_format("arrow")[:][label_col]
    labels = _labels(column, source, display_name(label_col, columns), expected_label)
    mark(~np.isin(labels, valid), label_col, expected_label, lambda r: repr(column[r].as_py()))

    captions = table.select_columns(["caption"]).with_format("arrow")[:]["caption"]
    if pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type):
        empty = pc.equal(pc.utf8_trim_whitespace(captions), "").fill_null(True)
        mask = np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool)
    else:
        mask = np.ones(len(captions), dtype=bool)
    mark(mask, "caption", CAPTION_EXPECTED, lambda r: repr(captions[r].as_py()))

    for name in IMAGE_COLUMNS_OF[fmt]:
        images = table.select_columns([name]).with_format("arrow")[:][name]
        mark(_missing(images), name, IMAGE_EXPECTED, lambda r: "no image (null or empty)")
    return labels, bad


def _labels(column: pa.ChunkedArray, source: str, name: str, expected: str) -> np.ndarray:
    """float64 labels; text parsed per value (NaN where it is not a number)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:  # fast path: every value is a number's text
            return pc.cast(pc.utf8_trim_whitespace(column), pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = [as_label(v) for v in column.to_pylist()]
            return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    try:
        labels = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(
            f"{source}: column {name} has type {column.type}; expected numbers {expected} ({e})"
        ) from None
    return np.asarray(labels, dtype=np.float64)


def _missing(images: pa.ChunkedArray) -> np.ndarray:
    """Rows whose image value is null, or holds neither bytes nor a path, without reading image data."""
    if pa.types.is_struct(
        images.type
    ):  # datasets.Image {"bytes", "path"}, or a tar member {"offset", "size"}
        fields = [f for f in ("bytes", "path", "size") if f in images.type.names]
        present = pc.invert(images.is_null())
        found = [_nonempty(pc.struct_field(images, f)) for f in fields]
        has_any = found[0] if found else pc.and_(present, False)
        for more in found[1:]:
            has_any = pc.or_(has_any, more)
        present = pc.and_(present, has_any).fill_null(False)
    else:
        present = _nonempty(images)
    return ~np.asarray(present.to_numpy(zero_copy_only=False), dtype=bool)


def _nonempty(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a value is non-empty bytes or text (a path), a positive size, or any other non-null value."""
    t = values.type
    if pa.types.is_null(t):
        return pc.is_valid(values)  # all False
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.greater(pc.binary_length(values), 0).fill_null(False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.greater(pc.utf8_length(values), 0).fill_null(False)
    if pa.types.is_integer(t):
        return pc.greater(values, 0).fill_null(False)
    return pc.is_valid(values)


def image_problem(value: Any, fetch: Callable[[Any], Any] | None = None) -> str:
    """'' when `value` (fetched by `fetch`: a tar member, a relative path) decodes to an image of at least
    MIN_IMAGE_SIDE pixels a side, else what is wrong."""
    try:
        decode_image(fetch(value) if fetch else value, min_side=MIN_IMAGE_SIDE)
    except Exception as e:
        return describe_image_error(e)
    return ""


def describe_image_error(e: Exception) -> str:
    """`got` text for an image that failed: '4x3 pixels' or 'undecodable data (cannot decode image: ...)'."""
    text = str(e).split(" <_io.BytesIO")[0].strip()  # PIL names the buffer object: noise
    if isinstance(e, ValueError) and "smaller than" in text:
        return text.split(",")[0].replace("image is ", "an image of ")
    if isinstance(e, (ValueError, TypeError)) and (
        "missing" in text or "empty" in text or "expected image" in text
    ):
        return f"no image ({text})"
    return f"undecodable data (cannot decode image: {text or type(e).__name__})"
