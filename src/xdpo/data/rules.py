"""The data's rules across config keys (a rule owner of `xdpo.config.rules`): which columns a format maps,
and what the latent cache and streaming allow."""

from __future__ import annotations

from typing import Any

from xdpo.config import require
from xdpo.data.schema import SCHEMAS


def check(cfg: Any) -> None:
    d = cfg.data
    names = SCHEMAS[d.format]
    unknown = sorted(set(d.columns) - set(names))
    require(
        not unknown,
        "data.columns",
        f"unknown name(s) {', '.join(unknown)}; with data.format={d.format} it maps {', '.join(names)} "
        "to the dataset's columns",
        d.columns,
    )
    require(
        not (d.format == "images" and d.cache),
        "data.cache",
        "is not available with data.format=images (the cache holds pairs); leave data.cache empty",
        d.cache,
    )
    require(
        not d.streaming or d.max_pairs > 0,
        "data.max_pairs",
        "must be > 0 with data.streaming=true (the number of usable rows to read)",
        d.max_pairs,
    )
    require(
        not d.buckets or d.format == "pairs",
        "data.buckets",
        "buckets preference pairs (data.format=pairs) only",
        d.buckets,
    )
    require(
        not (d.cache and d.random_crop),
        "data.random_crop",
        "cannot be used with data.cache (a cached latent holds one crop); set data.random_crop=false",
        d.random_crop,
    )
    require(
        not (d.num_frames and d.format == "images"),
        "data.num_frames",
        "clips are read as preference pairs (data.format=pairs), not per-image data",
        d.num_frames,
    )
