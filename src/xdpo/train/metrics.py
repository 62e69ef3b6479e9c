"""Per-step metrics: aggregation over micro-batches and processes, and `metrics.jsonl` that survives resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from xdpo.objectives import LossOutput

QUANTILES = (0.05, 0.5, 0.95)
ROWS = ("loss", "reward_w", "reward_l", "delta_w", "delta_l", "timestep", "lambda", "clamp_w", "clamp_l")
KEYS = (
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
_quantiles: dict[torch.device, torch.Tensor] = {}


def _columns(r: LossOutput, ts: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """One micro-batch's [B, len(ROWS)] float32 block, one pair per row (a single stack)."""
    b = ts.shape[0]
    lam = torch.ones(b, device=ts.device) if w is None else w
    cols = (
        r.loss.detach(),
        r.reward_w,
        r.reward_l,
        r.delta_w,
        r.delta_l,
        ts,
        lam,
        r.clamped[:b],
        r.clamped[b:],
    )
    return torch.stack(cols, dim=1).float()


def summarize(
    accelerator: Any,
    records: list[tuple[LossOutput, torch.Tensor, torch.Tensor | None]],
    keep_deltas: bool = False,
) -> dict:
    """Means over all pairs of the optimizer step (all micro-batches, all processes): one gather, one sync.

    `records` holds (loss record, timesteps [B], lambda(t) [B] or None) per micro-batch. `keep_deltas`
    adds `deltas`: every image's delta = e_theta - e_ref (winners, then losers; 5 significant digits).
    A handful of small ops (a step's fixed cost): the per-row means in one reduction over the gathered
    [pairs, rows] block, whose values equal per-row `.mean()` calls bit for bit (tests/test_metrics.py).
    """
    blocks = [_columns(*rec) for rec in records]
    local = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    g = accelerator.gather(local).T  # [rows, all pairs of the step]
    means = g.mean(dim=1)  # loss, reward_w, reward_l, delta_w, delta_l, timestep, lambda, (clamp_w, clamp_l)
    margin = g[1] - g[2]
    deltas = torch.cat([g[3], g[4]])
    q = _quantiles.get(deltas.device)
    if q is None:
        q = _quantiles[deltas.device] = torch.tensor(QUANTILES, device=deltas.device)
    extra = torch.stack(
        [
            ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
            margin.mean(),
            torch.cat([g[7], g[8]]).mean(),
            deltas.abs().max(),
        ]
    )
    values = torch.cat([means[:7], extra, torch.quantile(deltas, q)]).tolist()  # the one sync
    loss, reward_w, reward_l, delta_w, delta_l, t_mean, lam_mean = values[:7]
    acc, margin_mean, clamp, abs_max = values[7:11]
    stats = [loss, acc, margin_mean, reward_w, reward_l, clamp, delta_w, delta_l, abs_max, t_mean, lam_mean]
    stats += values[11:]
    row = dict(zip(KEYS, stats, strict=True))
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
