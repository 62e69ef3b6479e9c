"""The Pick-a-Pic v2 schema, where a table's files are, and which file and row a table row comes from.

Schema (https://huggingface.co/datasets/yuvalkirstain/pickapic_v2): `caption` (str), `jpg_0`, `jpg_1`
(encoded images), `label_0` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie); `label_1 = 1 - label_0`.
Other columns are ignored, except the optional `image_0_uid` / `image_1_uid` (image identities, used to
find repeated rows without reading the images).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import datasets

from xdpo.errors import DataError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
UID_COLUMNS = ("image_0_uid", "image_1_uid")
TIE_MODES = ("drop", "keep")
ON_BAD_ROW = ("error", "skip")
VALID_LABELS = (0.0, 0.5, 1.0)
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def check_columns(names: Sequence[str], source: str) -> None:
    """DataError naming the missing Pick-a-Pic columns (never skippable: every row lacks them)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; the Pick-a-Pic schema needs "
            f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(names) or 'none'})"
        )


def undecoded_images(table: datasets.Dataset) -> datasets.Dataset:
    """Switch `Image()` features to `decode=False` (bytes/path dicts; no data rewritten)."""
    for col in IMAGE_COLUMNS:
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
