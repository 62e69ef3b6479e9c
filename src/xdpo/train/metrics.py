"""Per-step metrics: aggregation over micro-batches and processes, and `metrics.jsonl` that survives resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from xdpo.objectives import LossOutput

QUANTILES = torch.tensor([0.05, 0.5, 0.95])
ROWS = ("loss", "reward_w", "reward_l", "delta_w", "delta_l", "timestep", "lambda", "clamp_w", "clamp_l")


def summarize(
    accelerator: Any,
    records: list[tuple[LossOutput, torch.Tensor, torch.Tensor | None]],
    keep_deltas: bool = False,
) -> dict:
    """Means over all pairs of the optimizer step (all micro-batches, all processes): one gather, one sync.

    `records` holds (loss record, timesteps [B], lambda(t) [B] or None) per micro-batch. `keep_deltas`
    adds `deltas`: every image's delta = e_theta - e_ref (winners, then losers; 5 significant digits).
    """
    parts = []
    for r, ts, w in records:
        b = ts.shape[0]
        lam = torch.ones(b, device=ts.device) if w is None else w.float()
        clamped = r.clamped.float().view(2, b)
        parts.append(
            torch.stack(
                [
                    r.loss.detach().float(),
                    r.reward_w.float(),
                    r.reward_l.float(),
                    r.delta_w.float(),
                    r.delta_l.float(),
                    ts.float(),
                    lam,
                    clamped[0],
                    clamped[1],
                ]
            )
        )
    g = accelerator.gather(torch.cat(parts, dim=1).T.contiguous()).T  # [rows, all pairs of the step]
    v = dict(zip(ROWS, g, strict=True))
    margin = v["reward_w"] - v["reward_l"]
    deltas = torch.cat([v["delta_w"], v["delta_l"]])
    stats = torch.stack(
        [
            v["loss"].mean(),
            ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
            margin.mean(),
            v["reward_w"].mean(),
            v["reward_l"].mean(),
            torch.cat([v["clamp_w"], v["clamp_l"]]).mean(),
            v["delta_w"].mean(),
            v["delta_l"].mean(),
            deltas.abs().max(),
            v["timestep"].mean(),
            v["lambda"].mean(),
            *torch.quantile(deltas.float(), QUANTILES.to(deltas.device)),
        ]
    ).tolist()
    keys = (
        "loss",
        "implicit_acc",
        "reward_margin",
        "reward_w",
        "reward_l",
        "clamp_fraction",
        # where the log-ratios live (docs/math.md §2): xDPO differs from DPO only where |n*delta| is large
        "delta_w",
        "delta_l",
        "delta_abs_max",
        "timestep_mean",
        "lambda_mean",
        "delta_q05",  # quantiles of delta over the step's 2B images: where xDPO's transform acts
        "delta_q50",
        "delta_q95",
    )
    row = dict(zip(keys, stats, strict=True))
    if keep_deltas:
        row["deltas"] = [float(f"{d:.5g}") for d in deltas.tolist()]
    return row


class MetricsLog:
    """Append-only JSON lines; on resume, lines after the resumed step are dropped (no step logged twice)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True) -> None:
        self.path, self.enabled, self.file = Path(path), enabled, None
        if not enabled:
            return
        kept = []
        if resume_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if row.get("step", math.inf) <= resume_step:
                    kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)  # a crash here leaves the old file or the new one, never neither
        self.file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
