"""Per-step metrics: aggregation over micro-batches and processes, the run's diagnostics (accuracy and margin
per timestep bucket, the effective beta, a warning when the implicit accuracy stays at chance), and
`metrics.jsonl` that survives resume."""

from __future__ import annotations

import json
import math
import os
from collections import deque
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


def bucket_names(buckets: int, num_steps: int) -> list[str]:
    """`t<lo>-<hi>` per bucket: bucket k holds the timesteps floor(k T / K) .. floor((k + 1) T / K) - 1
    (T = num_steps, K = buckets; k = 0 the least noisy)."""
    edges = [k * num_steps // buckets for k in range(buckets + 1)]
    return [f"t{edges[k]}-{edges[k + 1] - 1}" for k in range(buckets)]


def _per_bucket(t: torch.Tensor, correct: torch.Tensor, margin: torch.Tensor, buckets: int, num_steps: int):
    """[count, accuracy, mean margin] per bucket ([3K]); NaN where a bucket is empty."""
    k = (t.long() * buckets).div(num_steps, rounding_mode="floor").clamp(0, buckets - 1)
    onehot = torch.nn.functional.one_hot(k, buckets).to(margin.dtype)  # [pairs, K]
    count = onehot.sum(0)
    return torch.cat([count, (correct @ onehot) / count, (margin @ onehot) / count])


def summarize(
    accelerator: Any,
    records: list[tuple[LossOutput, torch.Tensor, torch.Tensor | None]],
    keep_deltas: bool = False,
    buckets: int = 0,
    num_steps: int = 1000,
) -> dict:
    """Means over all pairs of the optimizer step (all micro-batches, all processes): one gather, one sync.

    `records` holds (loss record, timesteps [B], lambda(t) [B] or None) per micro-batch. `keep_deltas`
    adds `deltas`: every image's delta = e_theta - e_ref (winners, then losers; 5 significant digits).
    A handful of small ops (a step's fixed cost): the per-row means in one reduction over the gathered
    [pairs, rows] block, whose values equal per-row `.mean()` calls bit for bit (tests/test_metrics.py).
    `buckets` > 0 adds `implicit_acc_<bucket>` and `reward_margin_<bucket>` per timestep bucket
    (`bucket_names`), in the same sync: the share of the bucket's pairs with reward_w > reward_l (ties
    count 0.5) and their mean reward_w - reward_l; None for a bucket without pairs this step.
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
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    extra = torch.stack([correct.mean(), margin.mean(), torch.cat([g[7], g[8]]).mean(), deltas.abs().max()])
    parts = [means[:7], extra, torch.quantile(deltas, q)]
    if buckets > 0:
        parts.append(_per_bucket(g[5], correct, margin, buckets, num_steps))
    values = torch.cat(parts).tolist()  # the one sync
    loss, reward_w, reward_l, delta_w, delta_l, t_mean, lam_mean = values[:7]
    acc, margin_mean, clamp, abs_max = values[7:11]
    stats = [loss, acc, margin_mean, reward_w, reward_l, clamp, delta_w, delta_l, abs_max, t_mean, lam_mean]
    stats += values[11:14]
    row = dict(zip(KEYS, stats, strict=True))
    if buckets > 0:
        count, acc_k, margin_k = (values[14 + i * buckets : 14 + (i + 1) * buckets] for i in range(3))
        for name, n, a, m in zip(bucket_names(buckets, num_steps), count, acc_k, margin_k, strict=True):
            row[f"implicit_acc_{name}"], row[f"reward_margin_{name}"] = (a, m) if n > 0 else (None, None)
    if keep_deltas:
        row["deltas"] = [float(f"{d:.5g}") for d in deltas.tolist()]
    return row


RATIO_TOLERANCE = 1e-3
"""max |ratio - 1| allowed at the first update of a round (fp32 numerics of a batched vs a split CFG pass are
~1e-6; bf16 sampling can exceed it, which is what the warning is for)."""


def summarize_extra(accelerator: Any, records: list) -> dict[str, float]:
    """Means over the step's rows (all micro-batches, all processes) of each objective's `LossOutput.extra`
    quantity, and the max of `ratio_dev` as `ratio_dev_max`; one gather, only when there are any."""
    if not records or not records[0][0].extra:
        return {}
    keys = sorted(records[0][0].extra)
    local = torch.cat([torch.stack([r[0].extra[k].float() for k in keys], dim=1) for r in records])
    g = accelerator.gather(local)
    row = dict(zip(keys, g.mean(dim=0).tolist(), strict=True))
    if "ratio_dev" in row:
        row["ratio_dev_max"] = float(g[:, keys.index("ratio_dev")].max())
    return row


def count_totals(accelerator: Any, outs: list[LossOutput]) -> dict[str, int]:
    """The objective's per-row flags (`LossOutput.counts`, e.g. SePPO's aaf_loser / aaf_winner / aaf_skipped)
    summed over the step's micro-batches and processes (one gather); {} when it counts nothing."""
    if not outs or outs[0].counts is None:
        return {}
    names = list(outs[0].counts)
    local = torch.stack([sum(o.counts[k].float().sum() for o in outs) for k in names])
    totals = accelerator.gather(local.unsqueeze(0)).sum(dim=0).tolist()
    return {k: int(round(v)) for k, v in zip(names, totals, strict=True)}


class Diagnostics:
    """What explains a run beyond the loss, added to every step's row by `row()`:
    - `implicit_acc` / `reward_margin` per timestep bucket (`train.timestep_buckets`, `summarize`);
    - `beta_eff` = the objective's scale (`Objective.scale`: loss.beta, or e.g. MaPO's mapo.logit_scale)
      x mean lambda(t) of the step (the factor between the implicit reward difference and the logits);
    - once, at step `train.chance_warning_steps`, one warning line when the implicit accuracy of steps
      (N/2, N] is within two standard errors (0.5 / sqrt(pairs)) of chance, naming what to check.
    Objectives without a scale (SFT: no reference, rewards 0) get neither `beta_eff` nor the warning.
    """

    def __init__(self, cfg: Any, objective: Any, num_steps: int, rows_per_step: int, lr: float) -> None:
        t = cfg.train
        self.cfg, self.num_steps, self.rows, self.lr = cfg, num_steps, rows_per_step, lr
        self.buckets, self.at = t.timestep_buckets, t.chance_warning_steps
        self.scale = objective.scale(cfg) if objective.scale is not None else None
        self.window: deque[float] = deque(maxlen=max(self.at - self.at // 2, 1))
        self.checked = self.at == 0 or self.scale is None
        self.ratio_note: str | None = None
        self.ratio_warned = False

    def about(self) -> str:
        """One line for the run's start: what the effective beta is made of."""
        if self.scale is None:
            return "effective beta: none (the objective's loss has no preference scale)"
        key, value = self.scale
        return f"effective beta (beta_eff in metrics.jsonl) = {key} ({value:g}) x mean lambda(t)"

    def row(
        self, accelerator: Any, records: list, keep_deltas: bool = False, fresh: bool = False
    ) -> dict[str, Any]:
        """`summarize` of the step, with the buckets, `beta_eff` and the objective's extra quantities
        (`summarize_extra`). `fresh`: the step is the first of an online round (the policy still is the
        model that sampled it), where the likelihood ratio must be 1: `ratio_at_start` = max |ratio - 1|."""
        row = summarize(accelerator, records, keep_deltas, self.buckets, self.num_steps)
        if self.scale is not None:
            row["beta_eff"] = self.scale[1] * row["lambda_mean"]
        row |= summarize_extra(accelerator, records)
        if fresh and "ratio_dev_max" in row:
            row["ratio_at_start"] = row["ratio_dev_max"]
            if row["ratio_at_start"] > RATIO_TOLERANCE and self.ratio_note is None:
                self.ratio_note = (
                    f"Warning: the log-probabilities recomputed at training time differ from those recorded "
                    f"when sampling, on the same weights: max |ratio - 1| = {row['ratio_at_start']:.3g} > "
                    f"{RATIO_TOLERANCE:g} at the first update of a round (docs/math.md §12.2). PPO's clipping is "
                    f"then biased: check mixed precision, LoRA dropout (model.lora_dropout) and the sampler."
                )
        return row

    def chance_warning(self, step: int, row: dict[str, Any]) -> str | None:
        """The warning line, once, at the first step >= `train.chance_warning_steps` (None otherwise); the
        ratio-at-start warning, once, at the step that found it."""
        if self.ratio_note and not self.ratio_warned:
            self.ratio_warned = True
            return self.ratio_note
        if self.checked:
            return None
        if step > self.at // 2:
            self.window.append(row["implicit_acc"])
        if step < self.at:
            return None
        self.checked = True
        if len(self.window) < self.window.maxlen:  # resumed past the window's start: not enough to judge
            return None
        n = self.rows * len(self.window)
        acc, band = sum(self.window) / len(self.window), 2 * 0.5 / math.sqrt(n)
        if abs(acc - 0.5) > band:
            return None
        lc, t = self.cfg.loss, self.cfg.train
        return (
            f"Warning: the implicit accuracy is still at chance after {step} steps ({acc:.3f} over the last "
            f"{len(self.window)} steps, {n} pairs; chance is 0.5 +- {band:.3f}): the policy does not rank the "
            f"preferred images first yet. Check the effective beta ({row.get('beta_eff', 0):.3g} = "
            f"{self.scale[0]} x mean lambda(t)) against the size of the error differences "
            f"(loss.error_reduction={lc.error_reduction}; reward_margin {row['reward_margin']:.3g} is the "
            f"logits: near 0, beta is too small for these errors), and the learning rate ({self.lr:.3g} "
            f"after train.warmup_steps={t.warmup_steps})"
        )


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
