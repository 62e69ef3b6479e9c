"""Preference pairs of video clips (video families, `data.num_frames` > 0): the Pick-a-Pic schema with clips.

The table is read by every reader of `sources.py` (parquet, json/jsonl/csv, save_to_disk, webdataset tar
shards, hub datasets, streamed), with the clip columns in place of the image columns (`jpg_0`, `jpg_1`,
renamed with `data.columns`, e.g. `jpg_0:video_0,jpg_1:video_1`). A cell holds a video's bytes (mp4,
webm, ...), a path to a video file or to a folder of frames (relative paths are looked up as image paths
are: next to the table's file, then in the data root), a webdataset member (`KEY.mp4`), or a list of
encoded frames. Clips are decoded and sampled by `xdpo.data.video` (`data.num_frames` frames at
`data.fps`), placed frame by frame with the pair's draws, and collated as image pairs are
(`collate_pairs`): pixels [2B, 3, F, R, R]. Labels, ties, bad rows, dropout and `(index, seed)` keys as
`PreferencePairs`; a clip that cannot be decoded is a bad row naming file, row and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.data.columns import display_name
from xdpo.data.pickapic import PreferencePairs
from xdpo.data.schema import image_roots
from xdpo.data.tarshards import is_member_ref
from xdpo.data.transforms import MIN_IMAGE_SIDE
from xdpo.data.validate import describe_image_error
from xdpo.data.video import CLIP_EXPECTED, decode_clip, place_clip_pair
from xdpo.errors import BadRowError, ConfigError


class PreferenceClips(PreferencePairs):
    """Transformed (winner, loser) clip pairs, indexed by `(index, seed)` as `PreferencePairs`."""

    noun = "clip pairs"
    none_decodable = "no pair has two decodable clips"

    def __init__(self, table: Any, *, num_frames: int, fps: float = 0.0, **kwargs: Any) -> None:
        if num_frames < 1:
            raise ConfigError(f"data.num_frames must be >= 1 for clips, got {num_frames}")
        self.num_frames, self.fps = int(num_frames), float(fps)
        super().__init__(table, **kwargs)

    def _clip_source(self, value: Any, record: dict[str, Any], row: int) -> Any:
        """Bytes, a file or folder path, or a list of frames, for `decode_clip`."""
        if is_member_ref(value) or isinstance(value, bytes | bytearray | memoryview | dict):
            return self.fetch(value, record, row)
        if isinstance(value, str | Path) and str(value):
            p = Path(value).expanduser()
            candidates = (
                [p] if p.is_absolute() else [r / p for r in image_roots(self.source, self.split, row)]
            )
            for c in [*candidates, p]:
                if c.exists():
                    return c
            raise ValueError(f"missing clip file or folder {str(value)!r}")
        return value

    @property
    def split(self) -> str:
        return self.fetch.split

    def _clip(self, record: dict[str, Any], column: str, row: int) -> list[Any]:
        try:
            source = self._clip_source(record[column], record, row)
            return decode_clip(source, self.num_frames, self.fps, min_side=MIN_IMAGE_SIDE)
        except Exception as e:
            raise BadRowError.at(
                self.locate(row),
                row,
                display_name(column, self.columns),
                CLIP_EXPECTED,
                describe_image_error(e),
            ) from None

    def _item(self, row: int, seed: int) -> dict[str, Any]:
        """As `PreferencePairs._item`, with clips: `pixel_w`, `pixel_l` [3, F, R, R]."""
        record = self.table[row]
        label = float(self.labels[row])
        caption = record["caption"]
        rng = np.random.default_rng(seed)
        if self.prompt_dropout > 0 and rng.random() < self.prompt_dropout:
            caption = ""
        col_w, col_l = ("jpg_1", "jpg_0") if label == 0.0 else ("jpg_0", "jpg_1")
        clip_w, clip_l = self._clip(record, col_w, row), self._clip(record, col_l, row)
        w, lo = place_clip_pair(
            clip_w, clip_l, self.resolution, rng, random_crop=self.random_crop, flip=self.flip
        )
        return {
            "caption": caption,
            "pixel_w": w.pixel,
            "pixel_l": lo.pixel,
            "label_w": label if label == 0.5 else 1.0,
            "row": row,
            "original_size": torch.tensor([w.original_size, lo.original_size], dtype=torch.long),
            "crop_top_left": torch.tensor([w.crop_top_left, lo.crop_top_left], dtype=torch.long),
        }
