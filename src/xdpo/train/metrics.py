"""Per-step metrics: aggregation over micro-batches and processes, and `metrics.jsonl` that survives resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from xdpo.objectives import LossOutput


def summarize(accelerator: Any, records: list[tuple[LossOutput, torch.Tensor, torch.Tensor | None]]) -> dict:
    """Means over all pairs of the optimizer step (all micro-batches, all processes).

    `records` holds (loss record, timesteps [B], lambda(t) [B] or None) per micro-batch.
    """
    cat = {
        "loss": torch.cat([r.loss.detach().float() for r, _, _ in records]),
        "reward_w": torch.cat([r.reward_w for r, _, _ in records]),
        "reward_l": torch.cat([r.reward_l for r, _, _ in records]),
        "delta_w": torch.cat([r.delta_w for r, _, _ in records]),
        "delta_l": torch.cat([r.delta_l for r, _, _ in records]),
        "timestep": torch.cat([ts.float() for _, ts, _ in records]),
        "lambda": torch.cat(
            [torch.ones_like(ts, dtype=torch.float32) if w is None else w.float() for _, ts, w in records]
        ),
        "clamp": torch.tensor([r.clamp_fraction for r, _, _ in records], device=records[0][0].loss.device),
    }
    g = {k: accelerator.gather(v.contiguous()).float() for k, v in cat.items()}
    margin = g["reward_w"] - g["reward_l"]
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    deltas = torch.cat([g["delta_w"], g["delta_l"]])
    return {
        "loss": g["loss"].mean().item(),
        "implicit_acc": acc.item(),
        "reward_margin": margin.mean().item(),
        "reward_w": g["reward_w"].mean().item(),
        "reward_l": g["reward_l"].mean().item(),
        "clamp_fraction": g["clamp"].mean().item(),
        # where the log-ratios live (DESIGN.md §3.2): xDPO differs from DPO only where |n*delta| is large
        "delta_w": g["delta_w"].mean().item(),
        "delta_l": g["delta_l"].mean().item(),
        "delta_abs_max": deltas.abs().max().item(),
        "timestep_mean": g["timestep"].mean().item(),
        "lambda_mean": g["lambda"].mean().item(),
    }


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
        self.path.write_text("".join(line + "\n" for line in kept))
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
