"""Writing a round folder (`xdpo.train.online` describes it): each process writes its part into
`round-NNNN.tmp/`, the main process merges the parts, writes the record and renames the folder into place,
so a round folder is complete or absent (a killed round is sampled again, at the same seeds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.errors import ConfigError
from xdpo.rollout.groups import RoundPlan, Scored
from xdpo.rollout.pairing import merge_parts, pair_columns, write_columns
from xdpo.train.online import PAIRS, RECORD, ROLLOUTS

MONITOR = "monitor.safetensors"
PER_STEP = ("sde_position", "sde_a", "sde_b", "sde_std", "sde_t")  # one value per recorded sampler step


def start(folder: Path, accelerator: Any) -> Path:
    """The (empty) temporary folder of a round being made."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    return tmp


def finish(tmp: Path, folder: Path, record: dict[str, Any], accelerator: Any) -> None:
    """The record, then the folder renamed into place (main process), every process waiting."""
    if accelerator.is_main_process:
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def write_pairs(
    tmp: Path, plan: RoundPlan, got: Scored, min_gap: float | None, r: int, accelerator: Any
) -> int:
    """Online DPO: this process's groups' best-vs-worst pairs, merged into `pairs.parquet`; the pair count."""
    jobs = got.jobs
    cols = pair_columns(
        [j.prompt for j in jobs], got.samples.images, got.local_scores(), [j.seed for j in jobs],
        [plan.prompt_index[j.group] for j in jobs], min_gap,
    )  # fmt: skip
    if cols["caption"]:
        write_columns(tmp / f"part-{accelerator.process_index:04d}.parquet", cols)
    accelerator.wait_for_everyone()
    n = 0
    if accelerator.is_main_process:
        parts = sorted(tmp.glob("part-*.parquet"))
        try:
            n = merge_parts(parts, tmp / PAIRS)
        except ConfigError as e:
            raise ConfigError(f"online.enabled: round {r}: {e}") from None
        for p in parts:
            p.unlink()
    accelerator.wait_for_everyone()
    return n


def write_rollouts(
    tmp: Path, plan: RoundPlan, got: Scored, grid_index: list[int], accelerator: Any, keep_images: bool
) -> None:
    """Rollouts: this process's latents (and PNGs), then one `rollouts.safetensors` over all N images; with a
    stochastic sampler also the recorded steps (`sde_*`, `xdpo.rollout.stochastic.stack_records`)."""
    from safetensors.torch import load_file, save_file

    rank = accelerator.process_index
    index = torch.tensor([j.index for j in got.jobs], dtype=torch.long)
    steps = {f"sde_{k}": v.contiguous() for k, v in got.samples.steps.items()}  # stochastic sampling
    save_file(
        {"latents": got.samples.latents.contiguous(), "index": index, **steps},
        str(tmp / f"part-{rank:04d}.safetensors"),
    )
    if keep_images:
        (tmp / "images").mkdir(exist_ok=True)
        for j, im in zip(got.jobs, got.samples.images, strict=True):
            im.save(tmp / "images" / f"{j.index:06d}.png")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [load_file(str(p)) for p in sorted(tmp.glob("part-*.safetensors"))]
        n = plan.n_groups * plan.per_prompt
        merged = {}
        for key in [k for k in parts[0] if k != "index"]:
            if key in PER_STEP:  # the same on every process
                merged[key] = parts[0][key]
                continue
            first = parts[0][key]
            merged[key] = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
            for p in parts:
                merged[key][p["index"]] = p[key]
        K = plan.per_prompt
        save_file(
            {
                **merged,
                "group": torch.arange(n) // K,
                "seed": torch.tensor([plan.seed_of(i // K, i % K) for i in range(n)], dtype=torch.long),
                "raw": torch.from_numpy(np.ascontiguousarray(got.raw)),
                "score": torch.from_numpy(got.score.copy()),
                "advantage": torch.from_numpy(got.advantage.copy()),
                "process": torch.from_numpy(got.process.copy()),
                "grid_index": torch.tensor(grid_index, dtype=torch.long),
            },
            str(tmp / ROLLOUTS),
        )
        for p in sorted(tmp.glob("part-*.safetensors")):
            p.unlink()
    accelerator.wait_for_everyone()


def write_monitor(tmp: Path, pixels: np.ndarray, accelerator: Any) -> None:
    """The fixed-seed monitor images as uint8 [M, H, W, 3] (round 0's are the initial model's)."""
    if accelerator.is_main_process and len(pixels):
        from safetensors.torch import save_file

        save_file({"pixels": torch.from_numpy(np.ascontiguousarray(pixels))}, str(tmp / MONITOR))


def read_monitor(folder: Path) -> np.ndarray | None:
    path = Path(folder) / MONITOR
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))["pixels"].numpy()
