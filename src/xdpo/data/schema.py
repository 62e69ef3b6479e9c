"""The Pick-a-Pic v2 schema, where a table's files are, and which file and row a table row comes from.

Schema (https://huggingface.co/datasets/yuvalkirstain/pickapic_v2): `caption` (str), `jpg_0`, `jpg_1`
(encoded images), `label_0` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie); `label_1 = 1 - label_0`.
Other columns are ignored, except the optional `image_0_uid` / `image_1_uid` (image identities, used to
find repeated rows without reading the images), `__url__` / `__key__` (the tar shard and sample key of a
webdataset row, `tarshards.py`) and `__row__` (the row of a streamed source, `streaming.py`), which name
where a row came from.

Per-image data (`data.format: images`, Diffusion-KTO): `image`, `caption`, `label` (1 desirable, 0 not).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets

from xdpo.config import DATA_COLUMNS
from xdpo.errors import DataError

REQUIRED_COLUMNS = DATA_COLUMNS["pairs"]
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
SCHEMAS = {"pairs": REQUIRED_COLUMNS, "images": DATA_COLUMNS["images"]}
"""The columns each `data.format` needs."""
IMAGE_COLUMNS_OF = {"pairs": IMAGE_COLUMNS, "images": ("image",)}
LABEL_COLUMN = {"pairs": "label_0", "images": "label"}
VALID_LABELS_OF = {"pairs": (0.0, 0.5, 1.0), "images": (0.0, 1.0)}
ORIGIN_COLUMNS = ("__url__", "__key__", "__row__")
"""Where a row came from: kept next to the schema's columns when a table has them."""
UID_COLUMNS = ("image_0_uid", "image_1_uid")
TIE_MODES = ("drop", "keep")
ON_BAD_ROW = ("error", "skip")
VALID_LABELS = (0.0, 0.5, 1.0)
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def as_label(value: Any) -> float | None:
    """A label as a float (numbers, booleans, and text or bytes such as "1.0"), None when not a number."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool | int | float):
        return float(value)
    return None


def check_columns(
    names: Sequence[str], source: str, fmt: str = "pairs", found: Sequence[str] | None = None
) -> None:
    """DataError naming the missing columns of `fmt`'s schema (never skippable: every row lacks them);
    `found`: the data's own column names to list (default `names`)."""
    required = SCHEMAS[fmt]
    missing = [c for c in required if c not in names]
    if missing:
        schema = "the Pick-a-Pic schema" if fmt == "pairs" else "data.format=images"
        listed = ", ".join(n for n in (names if found is None else found) if n not in ORIGIN_COLUMNS)
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; {schema} needs {', '.join(required)} "
            f"(found: {listed or 'none'}); name the data's "
            "own columns with data.columns, e.g. data.columns=caption:prompt,jpg_0:chosen,jpg_1:rejected"
        )


def undecoded_images(table: datasets.Dataset, fmt: str = "pairs") -> datasets.Dataset:
    """Switch `Image()` features to `decode=False` (bytes/path dicts; no data rewritten)."""
    for col in IMAGE_COLUMNS_OF[fmt]:
        feature = table.features.get(col)
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(col, datasets.Image(decode=False))
    return table


# ----------------------------------------------------------------------------------------------- files


def split_files(folder: Path) -> dict[str, list[Path]] | None:
    """Parquet files per split when their names follow the Hub's split naming, else None."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except Exception:
        return None
    splits = {
        str(name): sorted(Path(f) for f in files if str(f).endswith(".parquet"))
        for name, files in resolved.items()
    }
    splits = {name: files for name, files in splits.items() if files}
    if not splits or [str(k) for k in patterns] == ["train"] and list(patterns.values())[0] == ["**"]:
        return None  # no split naming: the folder is one table
    return splits


def parquet_files(path: str, split: str = "train") -> list[Path] | None:
    """The parquet files `load_preference_table(path, split)` reads, in order; None for other sources.

    A parquet file; a glob; a folder of parquet files (only `split`'s when the names follow the Hub's
    split naming). A `save_to_disk` folder and a Hub id are not parquet sources (None). Raises
    DataError for a glob without matches, a folder without parquet files, or a missing split.
    """
    local = Path(path).expanduser()
    if local.is_file():
        return [local]
    if glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(str(local), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        return files
    if not local.is_dir() or any((local / name).is_file() for name in SAVE_TO_DISK_FILES):
        return None
    files = sorted(f for f in local.rglob("*.parquet") if f.is_file())
    if not files:
        raise DataError(f"{path}: folder holds no *.parquet files and is not a datasets save_to_disk folder")
    splits = split_files(local)
    if splits is None:
        return files
    if split not in splits:
        raise DataError(
            f"{path}: no split {split!r} among the parquet files; available splits: {', '.join(splits)}"
        )
    return splits[split]


@lru_cache(maxsize=8)
def _file_rows(path: str, split: str) -> tuple[tuple[str, int], ...]:
    import pyarrow.parquet as pq

    try:
        files = parquet_files(path, split) or []
        return tuple((str(f), pq.read_metadata(f).num_rows) for f in files)
    except Exception:  # only used to word a message: never fail because of it
        return ()


def row_locator(source: str, split: str = "train") -> Callable[[int], str]:
    """`locate(row)` -> "FILE: row K" for a row of the table read from `source` (a row number of the table).

    For several parquet files the file holding the row and the row within it ("FILE: row K (row N of
    SOURCE)"); for one file, "FILE: row N"; otherwise "SOURCE: row N". Files are looked up on first use.
    """

    def locate(row: int) -> str:
        files = _file_rows(source, split) if source else ()
        if len(files) == 1:
            return f"{files[0][0]}: row {row}"
        start = 0
        for name, n in files:
            if row < start + n:
                return f"{name}: row {row - start} (row {row} of {source})"
            start += n
        return f"{source or 'preference table'}: row {row}"

    return locate


class TableLocator:
    """`locate(row)` for a table: "TAR: sample KEY" for webdataset rows, "SOURCE (streamed): row N" for a
    streamed source's rows, else `row_locator(source, split)`."""

    def __init__(self, table: datasets.Dataset, source: str, split: str = "train") -> None:
        names = table.column_names
        self.source, self.split = source, split
        self.kind = (
            "tar" if {"__url__", "__key__"} <= set(names) else "stream" if "__row__" in names else "file"
        )
        cols = {"tar": ["__url__", "__key__"], "stream": ["__row__"], "file": []}[self.kind]
        self.origin = table.select_columns(cols) if cols else None
        self.fallback = row_locator(source, split)

    def __call__(self, row: int) -> str:
        if self.origin is None:
            return self.fallback(row)
        rec = self.origin[int(row)]
        if self.kind == "tar":
            return f"{rec['__url__']}: sample {rec['__key__']}"
        return f"{self.source or 'preference table'} (streamed): row {rec['__row__']}"

    def __getstate__(self) -> dict:  # the fallback is a closure: rebuild it in the new process
        return {k: v for k, v in self.__dict__.items() if k != "fallback"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fallback = row_locator(self.source, self.split)


def data_root(source: str) -> Path | None:
    """The folder relative image paths may be relative to: a folder source itself, a file's folder, or
    the folder part of a glob before its first wildcard; None for a hub id."""
    if not source:
        return None
    local = Path(source).expanduser()
    if glob.has_magic(source):
        parts = []
        for part in local.parts:
            if glob.has_magic(part):
                break
            parts.append(part)
        return Path(*parts) if parts else Path(".")
    if local.is_dir():
        return local
    if local.is_file():
        return local.parent
    return None


def image_roots(source: str, split: str, row: int) -> list[Path]:
    """Folders a relative image path of `row` is looked up in: its parquet file's folder, then the data root."""
    roots: list[Path] = []
    start = 0
    for name, n in _file_rows(source, split) if source else ():
        if row < start + n:
            roots.append(Path(name).parent)
            break
        start += n
    root = data_root(source)
    if root is not None and root not in roots:
        roots.append(root)
    return roots
