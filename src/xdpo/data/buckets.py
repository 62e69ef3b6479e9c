"""Aspect-ratio buckets (`data.buckets`): each pair trained at the (width, height) nearest its images' shape.

Buckets are a list of `WxH` resolutions, or `auto`: every (W, H) with sides multiples of `data.bucket_step`
whose area is at most `data.resolution`^2 and whose aspect ratio lies within 1:4 and 4:1, the largest such
height for each width (as the SDXL paper's buckets and the LoRA trainers' `resolution` + `step`).
A pair goes to the bucket nearest in log aspect ratio to the mean of its two images' log aspect ratios, so
both images of a pair share one bucket (`PreferencePairs` resizes each to cover the bucket and crops,
`transforms.place_pair_in`); only image headers are read to place the pairs (no decoding).
Batches are drawn within a bucket (`xdpo.train.bucket_batches`): the data order stays a pure function of
(seed, step).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from xdpo.errors import ConfigError

MAX_RATIO = 4.0


def parse_buckets(specs: list[str], resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) of each bucket of `data.buckets` (`WxH` items, or `auto`), sorted, without repeats."""
    if specs == ["auto"]:
        return auto_buckets(resolution, step)
    out = []
    for s in specs:
        w, sep, h = s.lower().partition("x")
        if not sep or not w.strip().isdigit() or not h.strip().isdigit() or int(w) < 8 or int(h) < 8:
            raise ConfigError(f"config key `data.buckets`: expected WxH resolutions (e.g. 1024x1024,1152x896) or auto, got {s!r}")  # fmt: skip
        out.append((int(w), int(h)))
    return sorted(set(out))


def auto_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every width a multiple of `step` with the largest height (a multiple of `step`) such that W x H <=
    resolution^2 and the aspect ratio is within [1/4, 4]."""
    if step < 1:
        raise ConfigError("config key `data.bucket_step`: must be >= 1 with data.buckets=auto")
    area, out = resolution * resolution, []
    for w in range(step, int(resolution * math.sqrt(MAX_RATIO)) + 1, step):
        h = (area // w) // step * step
        if h >= step and 1 / MAX_RATIO <= w / h <= MAX_RATIO:
            out.append((w, h))
    return sorted(set(out))


def check_multiple(buckets: list[tuple[int, int]], multiple: int, family: str) -> None:
    """One line for a bucket whose sides are not multiples of what the family needs (VAE x patch)."""
    for w, h in buckets:
        if w % multiple or h % multiple:
            raise ConfigError(
                f"config key `data.buckets`: {w}x{h} has a side that is not a multiple of {multiple}, which "
                f"{family} needs"
            )


def nearest(log_ratios: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """Index of the bucket nearest each log(width / height) (ties: the first, i.e. the narrower)."""
    centers = np.log(np.array([w / h for w, h in buckets]))
    return np.abs(log_ratios[:, None] - centers[None, :]).argmin(axis=1)


def header_size(value: Any) -> tuple[int, int]:
    """(width, height) of an image from its header (bytes, a path or a PIL image); nothing decoded."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, Image.Image):
        return value.size
    if isinstance(value, bytes | bytearray | memoryview):
        value = io.BytesIO(value)
    with Image.open(value) as img:
        return img.size


def pair_buckets(items: Any, buckets: list[tuple[int, int]], progress: bool = False) -> np.ndarray:
    """The bucket of each usable pair of `items` (`PreferencePairs`), from its images' headers; a row whose
    header cannot be read goes by the first image that can, or to the squarest bucket."""
    from tqdm.auto import tqdm

    ratios = np.zeros(len(items.rows))
    table = items.table.select_columns(
        ["jpg_0", "jpg_1", *(c for c in ("__url__",) if c in items.table.column_names)]
    )
    square = float(np.log(min((w / h for w, h in buckets), key=lambda r: abs(math.log(r)))))
    for i, row in enumerate(tqdm(items.rows, desc="bucketing pairs", unit="pair", disable=not progress)):
        record = table[int(row)]
        logs = []
        for column in ("jpg_0", "jpg_1"):
            try:
                w, h = header_size(items.fetch(record[column], record, int(row)))
                logs.append(math.log(w / h))
            except Exception:  # noqa: BLE001 - a bad image is found (and reported) when the item is read
                continue
        ratios[i] = float(np.mean(logs)) if logs else square
    return nearest(ratios, buckets)
