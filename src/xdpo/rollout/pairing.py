"""Preference pairs from scored groups (`xdpo pairs`, online DPO's rounds), in the Pick-a-Pic v2 schema.

Pairs: best vs worst of each group (default), or every pair whose score gap exceeds `min_gap`. The winner
is `jpg_0` with `label_0 = 1` (`label_0 = 0.5` when the scores are equal), plus `score_0`, `score_1`,
`seed_0`, `seed_1` and `prompt_index`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.errors import ConfigError

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1", "seed_0", "seed_1", "prompt_index")


def pair_up(scores: Sequence[float], min_gap: float | None) -> list[tuple[int, int]]:
    """(winner, loser) indices among one prompt's images: best vs worst, or all pairs with gap > min_gap."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) < 2:
        return []
    if min_gap is None:
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        return [] if best == worst else [(best, worst)]
    out = []
    for i, j in combinations(range(len(s)), 2):
        if abs(s[i] - s[j]) > min_gap:
            out.append((i, j) if s[i] > s[j] else (j, i))
    return out


def pair_columns(
    captions: Sequence[str], images: Sequence[Any], scores: Sequence[float], seeds: Sequence[int],
    prompt_index: Sequence[int], min_gap: float | None,
) -> dict[str, list]:  # fmt: skip
    """The pairs of scored images (one entry per image), grouped by `prompt_index` in order of appearance."""
    cols: dict[str, list] = {k: [] for k in COLUMNS}
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prompt_index):
        groups.setdefault(int(p), []).append(j)
    for p, idx in groups.items():
        for win, lose in pair_up([scores[j] for j in idx], min_gap):
            a, b = idx[win], idx[lose]
            cols["caption"].append(captions[a])
            cols["jpg_0"].append(images[a])
            cols["jpg_1"].append(images[b])
            cols["label_0"].append(0.5 if scores[a] == scores[b] else 1.0)
            cols["score_0"].append(float(scores[a]))
            cols["score_1"].append(float(scores[b]))
            cols["seed_0"].append(int(seeds[a]))
            cols["seed_1"].append(int(seeds[b]))
            cols["prompt_index"].append(p)
    return cols


def write_columns(path: Path, cols: dict[str, list]) -> None:
    from xdpo.data import write_pairs_parquet

    extra = {k: v for k, v in cols.items() if k not in ("caption", "jpg_0", "jpg_1", "label_0")}
    write_pairs_parquet(path, cols["caption"], cols["jpg_0"], cols["jpg_1"], cols["label_0"], extra=extra)


def merge_parts(parts: list[Path], out: Path) -> int:
    """Concatenate the part files into `out` (atomically); return the number of pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in parts]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ConfigError(
            "no pairs: every prompt's images scored alike (try more --per-prompt or --min-gap 0)"
        )
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return table.num_rows
