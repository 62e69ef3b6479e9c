"""Pick-a-Pic v2 preference pairs: load the table, serve transformed (winner, loser) pairs, write the schema.

The schema and file lookup are in `schema.py`, row validation in `validate.py`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from xdpo.data.schema import (
    ON_BAD_ROW,
    REQUIRED_COLUMNS,
    TIE_MODES,
    VALID_LABELS,
    check_columns,
    parquet_files,
    row_locator,
    undecoded_images,
)
from xdpo.data.transforms import FLIP_MODES, MIN_IMAGE_SIDE, decode_image, transform_pair
from xdpo.data.validate import IMAGE_EXPECTED, ValidationReport, check_rows, describe_image_error
from xdpo.errors import BadRowError, ConfigError, DataError

# ----------------------------------------------------------------------------------------------- loading


def load_preference_table(
    path: str, split: str = "train", *, cache_dir: str | None = None
) -> datasets.Dataset:
    """Open a Pick-a-Pic-schema table without decoding any image.

    `path` is tried, in order, as: a parquet file; a glob of parquet files; a `save_to_disk` folder
    (Dataset, or DatasetDict from which `split` is taken); a folder of parquet files (searched
    recursively; when file names follow the Hub's split naming, e.g. `train-00000-of-00004.parquet`
    or `validation/...`, only `split` is read); otherwise a Hub dataset id, `load_dataset(path, split=split)`.
    `split` is ignored for a single file, a glob and a folder without split names.
    Parquet is converted once into the `datasets` cache (`cache_dir`, default `HF_DATASETS_CACHE`;
    about the data's size) and memory-mapped from then on; image columns stay encoded.
    """
    path = str(path)
    local = Path(path).expanduser()
    files = parquet_files(path, split)
    if files is not None:
        table = _load_parquet(files, path, cache_dir)
    elif local.is_dir():
        table = _load_saved(local, path, split)
    else:
        table = _load_hub(path, split, cache_dir)
    check_columns(table.column_names, path)
    return undecoded_images(table)


def _load_parquet(files: Sequence[Path], source: str, cache_dir: str | None = None) -> datasets.Dataset:
    for f in files:  # read only the footers: fail in seconds, not after converting 300 GB
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        check_columns(schema.names, str(f))
    try:
        return datasets.load_dataset(
            "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
        )
    except Exception as e:
        raise DataError(f"{source}: cannot load parquet data ({type(e).__name__}: {e})") from None


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
            f"Hugging Face Hub dataset with split {split!r} ({type(e).__name__}: {e})"
        ) from None


# ----------------------------------------------------------------------------------------------- pairs


class PreferencePairs(torch.utils.data.Dataset):
    """Transformed (winner, loser) pairs from a Pick-a-Pic table, indexed by `(index, seed)`.

    The winner comes first (label_0 == 1: jpg_0; label_0 == 0: jpg_1). Ties (label_0 == 0.5) are
    dropped (`ties="drop"`, as Diffusion-DPO trains) or kept with jpg_0 first and `label_w = 0.5`, the
    soft target of the loss (`preference_loss(label=...)`). Every random choice of an item (prompt
    dropout, crop, flips) comes from `np.random.default_rng(seed)`, so an item is a pure function of its
    key and a run can resume exactly.

    Bad rows (see `validate.py`): labels, captions and missing images are checked here, column-wise,
    without decoding; pass `bad_rows=` from `validate_pairs(...)` to also leave out rows it found.
    `on_bad_row="error"` raises the first one (`BadRowError`, one line naming file, row and column);
    `"skip"` leaves them out (`n_bad`, `bad_rows`). An image that fails to decode (or is under
    `MIN_IMAGE_SIDE` pixels a side) when an item is read raises with "error"; with "skip" the item is
    the next pair whose images decode (index + 1, + 2, ..., wrapping), deterministically, and lists the
    rows it passed over in `skipped_rows`. `max_pairs` > 0 keeps the first N usable pairs.
    """

    def __init__(
        self,
        table: datasets.Dataset,
        *,
        resolution: int,
        ties: str = "drop",
        flip: str = "none",
        random_crop: bool = False,
        prompt_dropout: float = 0.0,
        source: str = "",
        split: str = "train",
        on_bad_row: str = "error",
        bad_rows: Iterable[int] = (),
        max_pairs: int = 0,
    ) -> None:
        if ties not in TIE_MODES:
            raise ConfigError(f"data.ties must be one of {', '.join(TIE_MODES)}, got {ties!r}")
        if flip not in FLIP_MODES:
            raise ConfigError(f"data.flip must be one of {', '.join(FLIP_MODES)}, got {flip!r}")
        if on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"data.on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
        if not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"data.resolution must be a positive integer, got {resolution!r}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ConfigError(f"data.prompt_dropout must be in [0, 1], got {prompt_dropout!r}")
        self.source = source or "preference table"
        self.locate = row_locator(self.source, split)
        check_columns(table.column_names, self.source)
        self.table = undecoded_images(table.select_columns(list(REQUIRED_COLUMNS)))
        self.resolution, self.ties, self.flip, self.on_bad_row = resolution, ties, flip, on_bad_row
        self.random_crop, self.prompt_dropout = random_crop, float(prompt_dropout)
        self.labels, bad = check_rows(self.table, self.source, self.locate)
        if bad and on_bad_row == "error":
            raise ValidationReport(self.source, len(self.labels), bad=dict(sorted(bad.items()))).first_error()
        excluded = np.zeros(len(self.labels), dtype=bool)
        excluded[[r for r in (*bad, *bad_rows) if 0 <= r < len(excluded)]] = True
        self.bad_rows = np.flatnonzero(excluded)
        self.n_bad = len(self.bad_rows)
        is_tie = self.labels == 0.5
        self.n_ties = int(is_tie.sum())
        keep = ~excluded & (~is_tie if ties == "drop" else True)
        self.rows = np.flatnonzero(keep)
        self.n_dropped = int((is_tie & ~excluded).sum()) if ties == "drop" else 0
        if max_pairs:
            self.rows = self.rows[:max_pairs]
        self.n_pairs = len(self.rows)
        self.skipped: set[int] = set()  # rows found undecodable in this process (with on_bad_row="skip")

    def __len__(self) -> int:
        return self.n_pairs

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """`{"caption", "pixel_w", "pixel_l", "label_w", "row", "skipped_rows"}` for key `(index, seed)`.

        An int key uses seed = index. `skipped_rows` lists rows passed over because an image failed.
        """
        index, seed = (key, key) if isinstance(key, (int, np.integer)) else key
        if not -self.n_pairs <= index < self.n_pairs:
            raise IndexError(f"index {index} out of range for {self.n_pairs} pairs")
        index %= self.n_pairs
        passed: list[int] = []
        for step in range(self.n_pairs):
            row = int(self.rows[(index + step) % self.n_pairs])
            if row in self.skipped:
                passed.append(row)
                continue
            try:
                item = self._item(row, seed)
            except BadRowError:
                if self.on_bad_row == "error":
                    raise
                self.skipped.add(row)
                passed.append(row)
                continue
            item["skipped_rows"] = passed
            return item
        raise DataError(f"{self.source}: no pair has two decodable images ({len(passed)} tried)")

    def _item(self, row: int, seed: int) -> dict[str, Any]:
        record = self.table[row]
        label = float(self.labels[row])
        caption = record["caption"]
        rng = np.random.default_rng(seed)
        if self.prompt_dropout > 0 and rng.random() < self.prompt_dropout:
            caption = ""
        col_w, col_l = ("jpg_1", "jpg_0") if label == 0.0 else ("jpg_0", "jpg_1")
        img_w, img_l = self._image(record, col_w, row), self._image(record, col_l, row)
        pixel_w, pixel_l = transform_pair(
            img_w, img_l, self.resolution, rng, random_crop=self.random_crop, flip=self.flip
        )
        return {
            "caption": caption,
            "pixel_w": pixel_w,
            "pixel_l": pixel_l,
            "label_w": label if label == 0.5 else 1.0,
            "row": row,
        }

    def _image(self, record: dict, column: str, row: int) -> Image.Image:
        try:
            return decode_image(record[column], min_side=MIN_IMAGE_SIDE)
        except Exception as e:
            raise BadRowError.at(
                self.locate(row), row, column, IMAGE_EXPECTED, describe_image_error(e)
            ) from None


def collate_pairs(items: list[dict]) -> dict[str, Any]:
    """Stack `PreferencePairs` items into a batch.

    `label_w` [B] float32: P(first image preferred), 1 or 0.5 for a kept tie (the loss's `label`);
    `skipped_rows`: rows passed over in this batch because an image failed (on_bad_row=skip).
    """
    return {
        "captions": [it["caption"] for it in items],
        "pixel_w": torch.stack([it["pixel_w"] for it in items]),
        "pixel_l": torch.stack([it["pixel_l"] for it in items]),
        "label_w": torch.tensor([it["label_w"] for it in items], dtype=torch.float32),
        "rows": torch.tensor([it["row"] for it in items], dtype=torch.long),
        "skipped_rows": [r for it in items for r in it.get("skipped_rows", ())],
    }


# ----------------------------------------------------------------------------------------------- writing


def _encode(image: Image.Image | bytes, image_format: str) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if image_format.upper() in ("JPEG", "JPG") and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=image_format)
    return buf.getvalue()


def write_pairs_parquet(
    path: str | Path,
    captions: list[str],
    images_0: list[Image.Image],
    images_1: list[Image.Image],
    labels_0: list[float],
    *,
    image_format: str = "PNG",
    extra: dict[str, list] | None = None,
) -> Path:
    """Write pairs in the Pick-a-Pic v2 schema (images encoded with `image_format`; bytes pass through)."""
    columns = {"caption": captions, "jpg_0": images_0, "jpg_1": images_1, "label_0": labels_0}
    columns.update(extra or {})
    n = len(captions)
    wrong = {name: len(values) for name, values in columns.items() if len(values) != n}
    if wrong:
        detail = ", ".join(f"{name} has {k}" for name, k in wrong.items())
        raise DataError(f"{path}: all columns need {n} values (as captions); {detail}")
    clash = sorted(set(extra or {}) & {*REQUIRED_COLUMNS, "label_1"})
    if clash:
        raise DataError(f"{path}: extra column(s) {', '.join(clash)} would overwrite the Pick-a-Pic schema")
    for row, label in enumerate(labels_0):
        if label not in VALID_LABELS:
            raise DataError(f"{path}: row {row}, column label_0: expected 0, 0.5 or 1, got {label!r}")
    data = {
        "caption": pa.array(captions, pa.string()),
        "jpg_0": pa.array([_encode(im, image_format) for im in images_0], pa.binary()),
        "jpg_1": pa.array([_encode(im, image_format) for im in images_1], pa.binary()),
        "label_0": pa.array(labels_0, pa.float64()),
        "label_1": pa.array([1.0 - float(x) for x in labels_0], pa.float64()),
    }
    for name, values in (extra or {}).items():
        data[name] = pa.array(values)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), out)
    return out
