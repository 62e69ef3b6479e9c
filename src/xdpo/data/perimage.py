"""Per-image preference data (`data.format: images`): Diffusion-KTO's (image, caption, desirable) rows.

Columns `image` (an encoded image, `{bytes, path}` dict, path or tar member), `caption` and `label`
(1 = desirable, 0 = undesirable; numbers, booleans or text such as "1"); `data.columns` maps other
names, e.g. `data.columns=image:jpg,caption:prompt,label:thumbs_up`. Items are transformed as one
image of a pair is (`transforms.place_image`), with the same bad-row rules and `(index, seed)` keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import numpy as np
import torch

from xdpo.data.batch import Batch
from xdpo.data.items import RowItems
from xdpo.data.transforms import place_image


class PreferenceImages(RowItems):
    """Transformed images with a caption and a desirable flag, indexed by `(index, seed)`.

    `flip` other than "none" mirrors an image with p = 0.5; `prompt_dropout` empties the caption;
    `max_images` > 0 keeps the first N usable rows. Bad rows, `on_bad_row` and `skipped_rows` as
    `PreferencePairs` (a label other than 0 or 1 is bad). `n_desirable` counts the usable desirable rows.
    """

    @staticmethod
    def collate(items: list[dict]) -> Batch:
        """Items -> one `Batch` (`collate_images`), for a DataLoader's `collate_fn`."""
        return collate_images(items)

    fmt, noun, none_decodable = "images", "images", "no row has a decodable image"

    def __init__(
        self,
        table: datasets.Dataset,
        *,
        resolution: int,
        flip: str = "none",
        random_crop: bool = False,
        prompt_dropout: float = 0.0,
        source: str = "",
        split: str = "train",
        on_bad_row: str = "error",
        bad_rows: Iterable[int] = (),
        max_images: int = 0,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            table, resolution=resolution, flip=flip, prompt_dropout=prompt_dropout, random_crop=random_crop,
            source=source, split=split, on_bad_row=on_bad_row, bad_rows=bad_rows, limit=max_images,
            columns=columns,
        )  # fmt: skip
        self.n_ties = self.n_dropped = 0  # as PreferencePairs reports them: per-image data have no ties
        self.n_desirable = int((self.labels[self.rows] == 1.0).sum())

    def _item(self, row: int, seed: int) -> dict[str, Any]:
        """`{"caption", "pixel" [3, R, R], "desirable", "row", "original_size" [2], "crop_top_left" [2]}`."""
        record = self.table[row]
        caption = record["caption"]
        rng = np.random.default_rng(seed)
        if self.prompt_dropout > 0 and rng.random() < self.prompt_dropout:
            caption = ""
        image = self._image(record, "image", row)
        placed = place_image(
            image, self.resolution, rng, random_crop=self.random_crop, flip=self.flip != "none"
        )
        return {
            "caption": caption,
            "pixel": placed.pixel,
            "desirable": bool(self.labels[row] == 1.0),
            "row": row,
            "original_size": torch.tensor(placed.original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(placed.crop_top_left, dtype=torch.long),
        }


def collate_images(items: list[dict]) -> Batch:
    """Stack `PreferenceImages` items into a `Batch` of independent images: pixels [N, 3, R, R], `label`
    [N] 1 desirable / 0 undesirable, SDXL's `original_size` and `crop_top_left` [N, 2] long."""
    pixels = torch.stack([it["pixel"] for it in items])
    return Batch(
        captions=[it["caption"] for it in items],
        label=torch.tensor([it["desirable"] for it in items], dtype=torch.float32),
        pairs=False,
        pixel_size=tuple(pixels.shape[-2:]),
        pixels=pixels,
        sizes={k: torch.stack([it[k] for it in items]) for k in ("original_size", "crop_top_left")},
        rows=torch.tensor([it["row"] for it in items], dtype=torch.long),
        skipped_rows=[r for it in items for r in it.get("skipped_rows", ())],
    )
