"""Entry points for a run: the config's data as a table and a dataset of pairs or of single images.

`open_data(cfg)` -> (table, dataset, usable items): `PreferencePairs` (collate with `collate_pairs`; clip
pairs, `PreferenceClips`, with `data.num_frames` > 0) or, with `data.format=images`, `PreferenceImages`
(collate with `collate_images`). Every `data.*` key
that decides what is read applies: path, split, format, columns, streaming, max_pairs, ties,
on_bad_row, and the transforms (resolution, flip, random_crop, prompt_dropout).
"""

from __future__ import annotations

from typing import Any

import datasets

from xdpo.data.buckets import parse_buckets
from xdpo.data.clips import PreferenceClips
from xdpo.data.perimage import PreferenceImages
from xdpo.data.pickapic import PreferencePairs
from xdpo.data.sources import load_preference_table


def open_table(cfg: Any) -> datasets.Dataset:
    """The table of `cfg.data` (path, split, columns, format, streaming with max_pairs, ties, on_bad_row)."""
    d = cfg.data
    return load_preference_table(
        d.path, d.split, columns=d.columns, fmt=d.format, streaming=d.streaming, max_rows=d.max_pairs,
        ties=d.ties, on_bad_row=d.on_bad_row,
    )  # fmt: skip


def open_pair_data(cfg: Any, *, plain: bool = False) -> tuple[datasets.Dataset, PreferencePairs, int]:
    """(table, PreferencePairs, usable pairs) as a run reads them; `plain`: without prompt dropout and
    flips (what `xdpo cache` encodes). `data.on_bad_row` and `data.max_pairs` apply."""
    d = cfg.data
    table = open_table(cfg)
    clips = {"num_frames": d.num_frames, "fps": d.fps} if getattr(d, "num_frames", 0) else {}
    pairs = (PreferenceClips if clips else PreferencePairs)(
        table, resolution=d.resolution, ties=d.ties, flip="none" if plain else d.flip,
        random_crop=d.random_crop, prompt_dropout=0.0 if plain else d.prompt_dropout, source=d.path,
        split=d.split, on_bad_row=d.on_bad_row, max_pairs=d.max_pairs, columns=d.columns, **clips,
        **({"buckets": parse_buckets(d.buckets, d.resolution, d.bucket_step)} if d.buckets and not clips else {}),
    )  # fmt: skip
    return table, pairs, len(pairs)


def open_images(cfg: Any) -> tuple[datasets.Dataset, PreferenceImages, int]:
    """(table, PreferenceImages, usable images) for `data.format=images` (Diffusion-KTO's per-image data)."""
    d = cfg.data
    table = open_table(cfg)
    images = PreferenceImages(
        table, resolution=d.resolution, flip=d.flip, random_crop=d.random_crop, prompt_dropout=d.prompt_dropout,
        source=d.path, split=d.split, on_bad_row=d.on_bad_row, max_images=d.max_pairs, columns=d.columns,
    )  # fmt: skip
    return table, images, len(images)


def open_data(cfg: Any, *, plain: bool = False) -> tuple[datasets.Dataset, Any, int]:
    """`open_images(cfg)` with `data.format=images`, else `open_pair_data(cfg, plain=plain)`."""
    if cfg.data.format == "images":
        return open_images(cfg)
    return open_pair_data(cfg, plain=plain)
