"""Open preference data from any source: which loader reads `data.path`, and the config's entry points.

Sources (`load_preference_table`): parquet file / glob / folder; json, jsonl or csv files; a
`save_to_disk` folder; webdataset `.tar` shards (`tarshards.py`); a hub id; any of these streamed
(`data.streaming`, `streaming.py`). Column names are mapped by `data.columns` (`columns.py`).
A run opens its data through `entry.py` (`open_data(cfg)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from xdpo.data.columns import apply_columns, missing_columns
from xdpo.data.schema import LABEL_COLUMN, SCHEMAS, check_columns, parquet_files, undecoded_images
from xdpo.data.tarshards import load_tar_table, tar_files
from xdpo.errors import DataError

TEXT_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_preference_table(
    path: str,
    split: str = "train",
    *,
    cache_dir: str | None = None,
    columns: Mapping[str, str] | None = None,
    fmt: str = "pairs",
    streaming: bool = False,
    max_rows: int = 0,
    ties: str = "drop",
    on_bad_row: str = "error",
) -> datasets.Dataset:
    """Open a preference table in xdpo's schema (`fmt`: pairs or images) without decoding any image.

    `path` is tried, in order, as: webdataset `.tar` shards (a file, a comma list, a glob or a folder
    of them); a parquet file (json, jsonl or csv by their suffix); a glob of such files; a `save_to_disk`
    folder (Dataset, or DatasetDict from which `split` is taken); a folder of parquet files (searched
    recursively; when file names follow the Hub's split naming, e.g. `train-00000-of-00004.parquet`
    or `validation/...`, only `split` is read); otherwise a Hub dataset id, `load_dataset(path, split=split)`.
    `split` is ignored for files, globs and folders without split names.
    Parquet is converted once into the `datasets` cache (`cache_dir`, default `HF_DATASETS_CACHE`;
    about the data's size) and memory-mapped from then on; image columns stay encoded.
    `columns` maps xdpo's names to the data's own (`columns.py`). `streaming=True` reads only the first
    `max_rows` usable rows (`ties`, `on_bad_row` decide which are usable; `streaming.py`).
    """
    path = str(path)
    if streaming:
        from xdpo.data.streaming import stream_table

        return stream_table(
            path, split, max_rows=max_rows, columns=columns, fmt=fmt, ties=ties, on_bad_row=on_bad_row,
            cache_dir=cache_dir,
        )  # fmt: skip
    local = Path(path).expanduser()
    tars = tar_files(path)
    files = None if tars else parquet_files(path, split)
    if tars:
        table = load_tar_table(tars, path, cache_dir)
    elif files is not None:
        table = _load_files(files, path, cache_dir, columns, fmt)
    elif local.is_dir():
        table = _load_saved(local, path, split)
    else:
        table = _load_hub(path, split, cache_dir)
    table = apply_columns(table, columns, path, fmt)
    check_columns(table.column_names, path, fmt)
    return undecoded_images(table, fmt)


def _load_files(
    files: Sequence[Path], source: str, cache_dir: str | None, columns: Mapping[str, str] | None, fmt: str
) -> datasets.Dataset:
    builders = {TEXT_BUILDERS.get(f.suffix.lower(), "parquet") for f in files}
    if len(builders) > 1:
        raise DataError(f"{source}: mixes parquet, json and csv files; point data.path at one kind")
    builder = builders.pop()
    if builder == "parquet":
        for f in files:  # read only the footers: fail in seconds, not after converting 300 GB
            try:
                schema = pq.read_schema(f)
            except Exception as e:
                raise DataError(f"{f}: not a readable parquet file ({e})") from None
            _check_names(schema.names, str(f), columns, fmt)
    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
        )
    except Exception as e:
        raise DataError(f"{source}: cannot load {builder} data ({type(e).__name__}: {e})") from None


def _check_names(names: Sequence[str], source: str, columns: Mapping[str, str] | None, fmt: str) -> None:
    """The column checks of `apply_columns` and `check_columns` on a file's column names alone."""
    missing_columns(names, columns, source, fmt)
    cols = dict(columns or {})
    present = [n for n in SCHEMAS[fmt] if cols.get(n, n) in names]
    label = LABEL_COLUMN[fmt]
    if label not in cols and label not in present:
        present.append(label)  # chosen/rejected pairs (jpg_0 preferred), winner-only images (all preferred)
    check_columns(present, source, fmt, found=names)


def _load_saved(folder: Path, source: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{source}: cannot load this save_to_disk folder ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r}; available splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_hub(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"{path}: neither a local parquet file, glob or folder, nor a reachable or cached "
            f"Hugging Face Hub dataset with split {split!r} ({type(e).__name__}: {e}); "
            "a subset of a hub dataset: data.streaming=true with data.max_pairs"
        ) from None
