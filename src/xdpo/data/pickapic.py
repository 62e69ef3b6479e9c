"""Pick-a-Pic v2 preference pairs: serve transformed (winner, loser) pairs, write the schema.

Loading any source is in `sources.py` (`load_preference_table` is re-exported here), the schema and
file lookup in `schema.py`, row validation in `validate.py`, what pairs share with per-image data in
`items.py`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from xdpo.data.batch import Batch
from xdpo.data.items import RowItems
from xdpo.data.schema import REQUIRED_COLUMNS, TIE_MODES, VALID_LABELS
from xdpo.data.sources import load_preference_table
from xdpo.data.transforms import place_pair, place_pair_in
from xdpo.errors import ConfigError, DataError

__all__ = ["PreferencePairs", "collate_pairs", "load_preference_table", "write_pairs_parquet"]


class PreferencePairs(RowItems):
    """Transformed (winner, loser) pairs from a table in the Pick-a-Pic schema, indexed by `(index, seed)`.

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
    rows it passed over in `skipped_rows`. `max_pairs` > 0 keeps the first N usable pairs. `columns`
    (data.columns) names the data's own columns in messages (the table already has xdpo's names).
    """

    @staticmethod
    def collate(items: list[dict]) -> Batch:
        """Items -> one `Batch` (`collate_pairs`), for a DataLoader's `collate_fn`."""
        return collate_pairs(items)

    fmt, noun = "pairs", "pairs"

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
        columns: Mapping[str, str] | None = None,
        buckets: list[tuple[int, int]] | None = None,
    ) -> None:
        if ties not in TIE_MODES:
            raise ConfigError(f"data.ties must be one of {', '.join(TIE_MODES)}, got {ties!r}")
        self.ties = ties
        super().__init__(
            table, resolution=resolution, flip=flip, prompt_dropout=prompt_dropout, random_crop=random_crop,
            source=source, split=split, on_bad_row=on_bad_row, bad_rows=bad_rows, limit=max_pairs,
            columns=columns,
        )  # fmt: skip
        self.n_pairs = self.n_items
        if buckets:  # data.buckets: each pair's bucket from its images' headers (`xdpo.data.buckets`)
            from xdpo.data.buckets import pair_buckets

            self.buckets, self.bucket_of = list(buckets), pair_buckets(self, list(buckets))

    def _usable(self, excluded: np.ndarray) -> np.ndarray:
        is_tie = self.labels == 0.5
        self.n_ties = int(is_tie.sum())
        self.n_dropped = int((is_tie & ~excluded).sum()) if self.ties == "drop" else 0
        return ~excluded & (~is_tie if self.ties == "drop" else True)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        """`{"caption", "pixel_w", "pixel_l", "label_w", "row", "original_size", "crop_top_left",
        "skipped_rows"}` for key `(index, seed)`; an int key uses seed = index. `original_size` and
        `crop_top_left` are [2, 2] long tensors, rows (w, l): (height, width) before resizing and
        (top, left) of the crop in the resized image (SDXL's size conditions, `transforms.Placed`).
        `skipped_rows` lists rows passed over because an image failed."""
        return super().__getitem__(key)

    def _item(self, row: int, seed: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
        record = self.table[row]
        label = float(self.labels[row])
        caption = record["caption"]
        rng = np.random.default_rng(seed)
        if self.prompt_dropout > 0 and rng.random() < self.prompt_dropout:
            caption = ""
        col_w, col_l = ("jpg_1", "jpg_0") if label == 0.0 else ("jpg_0", "jpg_1")
        img_w, img_l = self._image(record, col_w, row), self._image(record, col_l, row)
        if size is None:
            w, lo = place_pair(
                img_w, img_l, self.resolution, rng, random_crop=self.random_crop, flip=self.flip
            )
        else:  # an aspect-ratio bucket (width, height)
            w, lo = place_pair_in(img_w, img_l, size, rng, random_crop=self.random_crop, flip=self.flip)
        return {
            "caption": caption,
            "pixel_w": w.pixel,
            "pixel_l": lo.pixel,
            "label_w": label if label == 0.5 else 1.0,
            "row": row,
            "original_size": torch.tensor([w.original_size, lo.original_size], dtype=torch.long),
            "crop_top_left": torch.tensor([w.crop_top_left, lo.crop_top_left], dtype=torch.long),
        }


def collate_pairs(items: list[dict]) -> Batch:
    """Stack `PreferencePairs` items into a `Batch` of pairs: pixels [2B, 3, R, R] as [w; l]; `label`
    [B] float32 P(first image preferred), 1 or 0.5 for a kept tie; SDXL's `original_size` and
    `crop_top_left` [2B, 2] long (`PreferencePairs`); `skipped_rows`: rows passed over because an image
    failed (on_bad_row=skip)."""
    pixels = torch.stack([it["pixel_w"] for it in items] + [it["pixel_l"] for it in items])
    sizes = {
        key: torch.cat([torch.stack([it[key][i] for it in items]) for i in (0, 1)])
        for key in ("original_size", "crop_top_left")
        if all(key in it for it in items)
    }
    return Batch(
        captions=[it["caption"] for it in items],
        label=torch.tensor([it["label_w"] for it in items], dtype=torch.float32),
        pairs=True,
        pixel_size=tuple(pixels.shape[-2:]),
        pixels=pixels,
        sizes=sizes,
        rows=torch.tensor([it["row"] for it in items], dtype=torch.long),
        skipped_rows=[r for it in items for r in it.get("skipped_rows", ())],
    )


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
