"""`xdpo relabel`: replace a preference table's labels with a reward model's (AI feedback).

Each row's two images are scored with the reward (see `xdpo.rollout.rewards`); `label_0` becomes 1 when jpg_0
scores higher, 0 when jpg_1 does, 0.5 when they are equal. The original label is kept as
`label_0_original`, the scores as `score_0` and `score_1`; other columns pass through.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.errors import ConfigError


def _image(value: Any, row: int, column: str, source: str) -> Any:
    from PIL import Image

    data = value.get("bytes") if isinstance(value, dict) else value
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # noqa: BLE001 - any decode failure is the same bad row
        raise ConfigError(f"{source}: row {row}, column {column}: not a decodable image") from None


def relabel(
    data: str, *, out: str | Path, reward: Any, reward_spec: str, split: str = "train", batch: int = 64,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Score both images of every row and write the relabelled table to `out` (parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from xdpo.data import load_preference_table

    table = load_preference_table(data, split)
    for col in ("caption", "jpg_0", "jpg_1"):
        if col not in table.column_names:
            raise ConfigError(f"--data: {data} has no column {col!r}")
    raw = table.with_format("arrow") if hasattr(table, "with_format") else table
    s0, s1 = np.zeros(len(table)), np.zeros(len(table))
    for start in tqdm(range(0, len(table), batch), desc="relabel", unit="batch", disable=not progress):
        rows = raw[start : start + batch].to_pylist()
        prompts = [r["caption"] or "" for r in rows]
        im0 = [_image(r["jpg_0"], start + i, "jpg_0", data) for i, r in enumerate(rows)]
        im1 = [_image(r["jpg_1"], start + i, "jpg_1", data) for i, r in enumerate(rows)]
        s0[start : start + len(rows)] = reward(im0, prompts)
        s1[start : start + len(rows)] = reward(im1, prompts)
    arrow = raw[:]  # the whole table as arrow (respects any row selection of the reader)
    labels = np.where(s0 > s1, 1.0, np.where(s0 < s1, 0.0, 0.5))
    if "label_0" in arrow.column_names:
        arrow = arrow.append_column("label_0_original", arrow.column("label_0"))
    for name in ("label_0", "label_1", "score_0", "score_1"):
        if name in arrow.column_names:
            arrow = arrow.drop_columns([name])
    arrow = arrow.append_column("label_0", pa.array(labels)).append_column("label_1", pa.array(1.0 - labels))
    arrow = arrow.append_column("score_0", pa.array(s0)).append_column("score_1", pa.array(s1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(arrow, tmp)
    os.replace(tmp, out)
    original = (
        arrow.column("label_0_original").to_numpy() if "label_0_original" in arrow.column_names else None
    )
    changed = None if original is None else int(np.sum(labels != original.astype(float)))
    summary = {"data": data, "out": str(out), "scorer": reward_spec, "rows": len(table), "ties": int(np.sum(labels == 0.5)), "labels_changed": changed}  # fmt: skip
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2))
    return summary
