"""Pick-a-Pic v2 preference pairs: load the table, serve transformed (winner, loser) pairs, write the schema.

Schema (https://huggingface.co/datasets/yuvalkirstain/pickapic_v2): `caption` (str), `jpg_0`, `jpg_1`
(encoded images), `label_0` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie); `label_1 = 1 - label_0`.
Other columns are ignored.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from xdpo.data.transforms import FLIP_MODES, decode_image, transform_pair
from xdpo.errors import ConfigError, DataError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
TIE_MODES = ("drop", "keep")
VALID_LABELS = (0.0, 0.5, 1.0)


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
    if local.is_file():
        table = _load_parquet([local], path, cache_dir)
    elif glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(str(local), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        table = _load_parquet(files, path, cache_dir)
    elif local.is_dir():
        table = _load_folder(local, path, split, cache_dir)
    else:
        table = _load_hub(path, split, cache_dir)
    _check_columns(table.column_names, path)
    return _undecoded_images(table)


def _load_parquet(files: Sequence[Path], source: str, cache_dir: str | None = None) -> datasets.Dataset:
    for f in files:  # read only the footers: fail in seconds, not after converting 300 GB
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        _check_columns(schema.names, str(f))
    try:
        return datasets.load_dataset(
            "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
        )
    except Exception as e:
        raise DataError(f"{source}: cannot load parquet data ({type(e).__name__}: {e})") from None


def _load_folder(folder: Path, source: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    if any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as e:
            raise DataError(
                f"{source}: cannot load this save_to_disk folder ({type(e).__name__}: {e})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r}; available splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    files = sorted(f for f in folder.rglob("*.parquet") if f.is_file())
    if not files:
        raise DataError(
            f"{source}: folder holds no *.parquet files and is not a datasets save_to_disk folder"
        )
    splits = _split_files(folder)
    if splits is None:
        return _load_parquet(files, source, cache_dir)
    if split not in splits:
        raise DataError(
            f"{source}: no split {split!r} among the parquet files; available splits: {', '.join(splits)}"
        )
    return _load_parquet(splits[split], source, cache_dir)


def _split_files(folder: Path) -> dict[str, list[Path]] | None:
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


def _load_hub(path: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"{path}: neither a local parquet file, glob or folder, nor a reachable or cached "
            f"Hugging Face Hub dataset with split {split!r} ({type(e).__name__}: {e})"
        ) from None


def _check_columns(names: Sequence[str], source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; the Pick-a-Pic schema needs "
            f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(names) or 'none'})"
        )


def _undecoded_images(table: datasets.Dataset) -> datasets.Dataset:
    """Switch `Image()` features to `decode=False` (bytes/path dicts; no data rewritten)."""
    for col in IMAGE_COLUMNS:
        feature = table.features.get(col)
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(col, datasets.Image(decode=False))
    return table


# ----------------------------------------------------------------------------------------------- pairs


def _labels(table: datasets.Dataset, source: str) -> np.ndarray:
    """label_0 as float64, validated (0, 0.5 or 1) without reading any other column."""
    column = table.select_columns(["label_0"]).with_format("arrow")[:]["label_0"]
    try:
        labels = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(
            f"{source}: column label_0 has type {column.type}; expected numbers 0, 0.5 or 1 ({e})"
        ) from None
    bad = ~np.isin(labels, VALID_LABELS)  # NaN and nulls (-> NaN) are not in the set
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = column[row].as_py()
        more = f" ({int(bad.sum())} invalid rows in all)" if bad.sum() > 1 else ""
        raise DataError(f"{source}: row {row}, column label_0: expected 0, 0.5 or 1, got {value!r}{more}")
    return labels


class PreferencePairs(torch.utils.data.Dataset):
    """Transformed (winner, loser) pairs from a Pick-a-Pic table, indexed by `(index, seed)`.

    The winner comes first (label_0 == 1: jpg_0; label_0 == 0: jpg_1). Ties (label_0 == 0.5) are
    dropped (`ties="drop"`, as Diffusion-DPO trains) or kept with jpg_0 first and `label_w = 0.5`.
    Every random choice of an item (prompt dropout, crop, flips) comes from `np.random.default_rng(seed)`,
    so an item is a pure function of its key and a run can resume exactly.
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
    ) -> None:
        if ties not in TIE_MODES:
            raise ConfigError(f"data.ties must be one of {', '.join(TIE_MODES)}, got {ties!r}")
        if flip not in FLIP_MODES:
            raise ConfigError(f"data.flip must be one of {', '.join(FLIP_MODES)}, got {flip!r}")
        if not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"data.resolution must be a positive integer, got {resolution!r}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ConfigError(f"data.prompt_dropout must be in [0, 1], got {prompt_dropout!r}")
        self.source = source or "preference table"
        _check_columns(table.column_names, self.source)
        self.table = _undecoded_images(table.select_columns(list(REQUIRED_COLUMNS)))
        self.resolution, self.ties, self.flip = resolution, ties, flip
        self.random_crop, self.prompt_dropout = random_crop, float(prompt_dropout)
        self.labels = _labels(self.table, self.source)
        is_tie = self.labels == 0.5
        self.n_ties = int(is_tie.sum())
        self.rows = np.flatnonzero(~is_tie) if ties == "drop" else np.arange(len(self.labels))
        self.n_dropped = len(self.labels) - len(self.rows)
        self.n_pairs = len(self.rows)

    def __len__(self) -> int:
        return self.n_pairs

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """`{"caption", "pixel_w", "pixel_l", "label_w", "row"}` for key `(index, seed)` (an int key uses seed = index)."""
        index, seed = (key, key) if isinstance(key, (int, np.integer)) else key
        if not -self.n_pairs <= index < self.n_pairs:
            raise IndexError(f"index {index} out of range for {self.n_pairs} pairs")
        row = int(self.rows[index])
        record = self.table[row]
        label = float(self.labels[row])
        caption = record["caption"]
        if not isinstance(caption, str):
            raise DataError(f"{self.source}: row {row}, column caption: expected a string, got {caption!r}")
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
            return decode_image(record[column])
        except Exception as e:
            raise DataError(f"{self.source}: row {row}, column {column}: cannot decode image ({e})") from None


def collate_pairs(items: list[dict]) -> dict[str, Any]:
    """Stack `PreferencePairs` items into a batch."""
    return {
        "captions": [it["caption"] for it in items],
        "pixel_w": torch.stack([it["pixel_w"] for it in items]),
        "pixel_l": torch.stack([it["pixel_l"] for it in items]),
        "label_w": torch.tensor([it["label_w"] for it in items], dtype=torch.float32),
        "rows": torch.tensor([it["row"] for it in items], dtype=torch.long),
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
