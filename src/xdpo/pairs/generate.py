"""`xdpo pairs`: sample K images per prompt at recorded seeds, score them, keep preference pairs.

The rollout engine (`xdpo.rollout.engine`) samples: image k of prompt p is drawn with seed `seed + p * K + k`
(its own CPU generator), so any image can be regenerated alone, in pipeline calls of `batch_size` images
across prompts. Pairs (`xdpo.rollout.pairing`): best vs worst per prompt (default), or every pair whose
score gap exceeds `min_gap`. The winner is `jpg_0` with `label_0 = 1` (`label_0 = 0.5` when the scores
are equal), in the Pick-a-Pic v2 schema plus `score_0`, `score_1`, `seed_0`, `seed_1` and `prompt_index`.
Work is done in chunks of prompts written as `OUT.parts/part-NNNNN.parquet` (renamed into place when
complete), so a killed run resumes where it stopped; the parts are merged into OUT at the end; the
summary (OUT.json) records the engine's images per second.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError
from xdpo.rollout.engine import RolloutEngine
from xdpo.rollout.groups import plan_round, sample_and_score
from xdpo.rollout.pairing import merge_parts, pair_columns, write_columns


def make_pairs(
    model: str,
    prompts: Any,
    *,
    out: str | Path,
    per_prompt: int,
    reward: Any,
    reward_spec: str,
    lora: str | None = None,
    seed: int = 0,
    min_gap: float | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str | None = None,
    batch_size: int = 8,
    chunk: int = 16,
    device: str | None = None,
    dtype: Any = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample, score and pair (module docstring); resumable; return the run's summary (also OUT.json)."""
    from tqdm.auto import tqdm

    from xdpo.evaluate.pipeline import load_pipeline, sampling_defaults
    from xdpo.evaluate.prompts import limit_records, resolve_prompt_records

    if per_prompt < 2:
        raise ConfigError(f"--per-prompt: at least 2 images per prompt make a pair, got {per_prompt}")
    records = limit_records(resolve_prompt_records(prompts), limit)
    defaults = sampling_defaults(model)
    steps = steps or defaults["steps"]
    guidance = defaults["guidance"] if guidance is None else guidance
    scheduler = scheduler or defaults["scheduler"]
    out = Path(out)
    parts_dir = out.with_name(out.name + ".parts")
    settings = {
        "model": str(model), "lora": lora, "prompts": str(prompts) if isinstance(prompts, str | Path) else None,
        "n_prompts": len(records), "per_prompt": per_prompt, "scorer": reward_spec, "seed": seed,
        "min_gap": min_gap, "steps": steps, "guidance": guidance, "scheduler": scheduler, "chunk": chunk,
    }  # fmt: skip
    parts_dir.mkdir(parents=True, exist_ok=True)
    args_file = parts_dir / "settings.json"
    if args_file.is_file() and json.loads(args_file.read_text()) != settings:
        raise ConfigError(
            f"--out: {parts_dir} holds a run with other settings; delete it or choose another --out"
        )
    args_file.write_text(json.dumps(settings, indent=2))
    chunks = [(i, records[i : i + chunk]) for i in range(0, len(records), chunk)]
    engine = None
    parts, images, seconds = [], 0, 0.0
    for n, (first, recs) in enumerate(tqdm(chunks, desc="pairs", unit="chunk", disable=not progress)):
        part = parts_dir / f"part-{n:05d}.parquet"
        parts.append(part)
        if part.is_file():
            continue  # done before a kill
        if engine is None:
            pipe = load_pipeline(model, lora=lora, scheduler=scheduler, device=device, dtype=dtype)
            engine = RolloutEngine(
                pipe, steps=steps, guidance=guidance, batch_images=batch_size, keep_latents=False
            )
        plan = plan_round(recs, per_prompt, seed, first_index=first)
        got = sample_and_score(engine, plan, reward)
        jobs = got.jobs
        cols = pair_columns(
            [j.prompt for j in jobs], got.samples.images, got.score, [j.seed for j in jobs],
            [plan.prompt_index[j.group] for j in jobs], min_gap,
        )  # fmt: skip
        images, seconds = images + len(jobs), seconds + got.samples.seconds
        tmp = part.with_name(part.name + ".tmp")
        write_columns(tmp, cols)
        os.replace(tmp, part)
    n_pairs = merge_parts(parts, out)
    summary = {**settings, "pairs": n_pairs, "out": str(out)}
    if seconds > 0:
        summary["images_per_second"] = round(images / seconds, 3)  # of this invocation's pipeline calls
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return summary
