"""`data.streaming`: the first `data.max_pairs` usable rows of a source, without downloading the rest.

The source is opened with `datasets.load_dataset(..., streaming=True)`: a hub id as
`load_dataset(path, split=split, streaming=True)`, local files through their builder
(`load_dataset("parquet" | "json" | "csv" | "webdataset", data_files=[...], streaming=True)`), so
both take the same path. Rows are read in order, renamed by `data.columns`, and kept while usable (a
label of the format, a non-empty caption, present images; ties only with `data.ties=keep`) until
`max_rows` are kept; a bad row stops the run (`data.on_bad_row=error`) or is left out (`skip`).
Images are stored as their bytes (a path is read: relative to the data root for local sources).

The kept rows go to an Arrow file in the datasets cache (`<cache>/xdpo-streamed/<digest>.arrow`,
memory-mapped, written once under a temporary name and renamed), named by a digest of the source
(and, for local files, their sizes and modification times), split, columns, format, max_rows, ties
and on_bad_row: a resumed or repeated run reads it instead of the network. Delete it to read the
source again (a hub dataset that changed). A `__row__` column keeps each row's number in the stream,
so later errors name it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from xdpo.data.columns import check_mapping, display_name, missing_columns, winner_only_notice
from xdpo.data.schema import (
    IMAGE_COLUMNS_OF,
    LABEL_COLUMN,
    SCHEMAS,
    VALID_LABELS_OF,
    as_label,
    check_columns,
    data_root,
    parquet_files,
)
from xdpo.errors import BadRowError, DataError

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}
BATCH = 64


def local_files(path: str) -> list[Path] | None:
    """The local files of `path` (a file, glob, folder or comma list of shards), or None (a hub id)."""
    from xdpo.data.tarshards import tar_files

    tars = tar_files(path)
    if tars:
        return tars
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(f for f in local.rglob("*") if f.is_file() and f.suffix in BUILDERS)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(BUILDERS)} files to stream")
        return files
    if local.is_file() or any(c in path for c in "*?["):
        return parquet_files(path)
    return None


def open_stream(path: str, split: str, cache_dir: str | None = None) -> datasets.IterableDataset:
    """`load_dataset(..., streaming=True)` of a hub id or local files, images left undecoded."""
    files = local_files(path)
    try:
        if files is None:
            stream = datasets.load_dataset(path, split=split, streaming=True, cache_dir=cache_dir)
        else:
            kinds = {BUILDERS.get(f.suffix) for f in files}
            if len(kinds) != 1 or None in kinds:
                raise DataError(
                    f"{path}: cannot stream these files together ({', '.join(sorted(f.suffix for f in files))}); "
                    f"streaming reads {', '.join(BUILDERS)}"
                )
            stream = datasets.load_dataset(
                kinds.pop(),
                data_files=[str(f) for f in files],
                split="train",
                streaming=True,
                cache_dir=cache_dir,
            )
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path}: cannot stream split {split!r} ({type(e).__name__}: {e}); data.streaming reads a hub id "
            "or local parquet, json, csv or tar files"
        ) from None
    return stream.decode(False)


def stream_digest(path: str, split: str, settings: Mapping[str, Any]) -> str:
    files = local_files(path)
    ident: dict[str, Any] = {"path": path, "split": split, **settings}
    if files is not None:
        ident["files"] = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def stream_table(
    path: str,
    split: str = "train",
    *,
    max_rows: int,
    columns: Mapping[str, str] | None = None,
    fmt: str = "pairs",
    ties: str = "drop",
    on_bad_row: str = "error",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """The first `max_rows` usable rows of the stream, in xdpo's schema (module docstring)."""
    if max_rows < 1:
        raise DataError("data.streaming: set data.max_pairs to the number of usable rows to read")
    columns = check_mapping(columns, fmt)
    settings = {
        "columns": columns,
        "format": fmt,
        "max_rows": max_rows,
        "ties": ties,
        "on_bad_row": on_bad_row,
    }
    out = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "xdpo-streamed"
    target = out / f"{stream_digest(path, split, settings)}.arrow"
    if not target.is_file():
        rows = _usable_rows(
            open_stream(path, split, cache_dir), path, columns, fmt, ties, on_bad_row, max_rows
        )
        out.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{uuid.uuid4().hex[:12]}")
        _write(tmp, rows, fmt)
        os.replace(tmp, target)
    return datasets.Dataset.from_file(str(target))


def _schema(fmt: str) -> pa.Schema:
    types = {"caption": pa.string(), "label_0": pa.float64(), "label": pa.float64()}
    return pa.schema([(c, types.get(c, pa.binary())) for c in SCHEMAS[fmt]] + [("__row__", pa.int64())])


def _write(target: Path, rows: Iterable[dict[str, Any]], fmt: str) -> None:
    schema = _schema(fmt)
    batch: list[dict[str, Any]] = []
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema))
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema))


def _usable_rows(
    stream: datasets.IterableDataset,
    source: str,
    columns: dict[str, str],
    fmt: str,
    ties: str,
    on_bad_row: str,
    max_rows: int,
) -> Iterable[dict[str, Any]]:
    names = SCHEMAS[fmt]
    label_col = LABEL_COLUMN[fmt]
    implicit = label_col not in columns  # chosen/rejected pairs, winner-only images: label 1
    files = local_files(source)
    root = None if files is None else data_root(source) or files[0].parent
    kept = 0
    for i, rec in enumerate(stream):
        if i == 0:
            found = list(rec)
            missing_columns(found, columns, source, fmt)
            present = [n for n in names if columns.get(n, n) in rec]
            if implicit and label_col not in present:
                present.append(label_col)
                if fmt == "images":
                    print(winner_only_notice(source), flush=True)
            check_columns(present, source, fmt, found=found)
        row = {n: rec.get(columns.get(n, n)) for n in names}
        if implicit and label_col not in rec:
            row[label_col] = 1.0
        where = f"{source} (streamed): row {i}"
        try:
            row = _check(row, fmt, label_col, root, where, i, columns)
        except BadRowError:
            if on_bad_row == "error":
                raise
            continue
        if row[label_col] == 0.5 and ties == "drop":
            continue
        row["__row__"] = i
        yield row
        kept += 1
        if kept >= max_rows:
            return


def _check(
    row: dict[str, Any],
    fmt: str,
    label_col: str,
    root: Path | None,
    where: str,
    i: int,
    columns: dict[str, str],
) -> dict[str, Any]:
    from xdpo.data.validate import CAPTION_EXPECTED, IMAGE_EXPECTED

    def bad(column: str, expected: str, got: str) -> BadRowError:
        return BadRowError.at(where, i, display_name(column, columns), expected, got)

    label = as_label(row[label_col])
    valid = VALID_LABELS_OF[fmt]
    if label is None or math.isnan(label) or label not in valid:
        expected = "0, 0.5 or 1" if fmt == "pairs" else "1 (desirable) or 0 (undesirable)"
        raise bad(label_col, expected, repr(row[label_col]))
    row[label_col] = label
    caption = row["caption"]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    if not isinstance(caption, str) or not caption.strip():
        raise bad("caption", CAPTION_EXPECTED, repr(caption))
    row["caption"] = caption
    for column in IMAGE_COLUMNS_OF[fmt]:
        try:
            row[column] = _image_bytes(row[column], root)
        except ValueError as e:
            raise bad(column, IMAGE_EXPECTED, f"no image ({e})") from None
    return row


def _image_bytes(value: Any, root: Path | None) -> bytes:
    """The encoded bytes of an undecoded image value (bytes, {bytes, path}, a path, a PIL image)."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray) and len(value):
        return bytes(value)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, str) and value:
        p = Path(value).expanduser()
        for candidate in ([p] if p.is_absolute() else [root / p] if root else []) + [p]:
            if candidate.is_file():
                return candidate.read_bytes()
        if "://" in value:
            from datasets.utils.file_utils import xopen

            with xopen(value, "rb") as f:
                return f.read()
        raise ValueError(f"missing image file {value!r}")
    raise ValueError("null or empty")
