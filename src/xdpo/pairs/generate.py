"""`xdpo pairs`: sample K images per prompt at recorded seeds, score them, keep preference pairs.

Image k of prompt p is drawn with seed `seed + p * K + k` (its own CPU generator), so any image can be
regenerated alone. Pairs: best vs worst per prompt (default), or every pair whose score gap exceeds
`min_gap`. The winner is `jpg_0` with `label_0 = 1` (`label_0 = 0.5` when the scores are equal), in the
Pick-a-Pic v2 schema plus `score_0`, `score_1`, `seed_0`, `seed_1` and `prompt_index`.
Work is done in chunks of prompts written as `OUT.parts/part-NNNNN.parquet` (renamed into place when
complete), so a killed run resumes where it stopped; the parts are merged into OUT at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.errors import ConfigError


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


def sample_and_pair(
    pipe: Any,
    records: list[dict[str, Any]],
    *,
    per_prompt: int,
    reward: Callable[[list, list[str]], np.ndarray],
    seed: int,
    first_index: int = 0,
    min_gap: float | None = None,
    steps: int = 25,
    guidance: float = 5.0,
    batch_size: int = 8,
    no_grad: Callable[[], Any] | None = None,
) -> dict[str, list]:
    """Columns of the pairs of `records` (prompt p has global index first_index + p) from `pipe`, sampled
    under `no_grad` (default `torch.inference_mode`; `torch.no_grad` where the model's forwards gather
    sharded parameters, which inference mode would turn into inference tensors)."""
    import torch

    no_grad = no_grad or torch.inference_mode
    jobs = [(p, k) for p in range(len(records)) for k in range(per_prompt)]
    seeds = [seed + (first_index + p) * per_prompt + k for p, k in jobs]
    images = []
    for i in range(0, len(jobs), batch_size):
        part = jobs[i : i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        with no_grad():
            images += pipe(
                prompt=[records[p]["prompt"] for p, _ in part],
                generator=gens,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="pil",
            ).images
    prompts = [records[p]["prompt"] for p, _ in jobs]
    scores = reward(images, prompts)
    cols: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "score_0", "score_1")}
    cols |= {"seed_0": [], "seed_1": [], "prompt_index": []}
    for p in range(len(records)):
        idx = [j for j, (q, _) in enumerate(jobs) if q == p]
        for win, lose in pair_up([scores[j] for j in idx], min_gap):
            a, b = idx[win], idx[lose]
            cols["caption"].append(records[p]["prompt"])
            cols["jpg_0"].append(images[a])
            cols["jpg_1"].append(images[b])
            cols["label_0"].append(0.5 if scores[a] == scores[b] else 1.0)
            cols["score_0"].append(float(scores[a]))
            cols["score_1"].append(float(scores[b]))
            cols["seed_0"].append(seeds[a])
            cols["seed_1"].append(seeds[b])
            cols["prompt_index"].append(first_index + p)
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

    from xdpo.evaluate.prompts import limit_records, resolve_prompt_records
    from xdpo.evaluate.sample import load_pipeline, sampling_defaults

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
    pipe = None
    parts = []
    for n, (first, recs) in enumerate(tqdm(chunks, desc="pairs", unit="chunk", disable=not progress)):
        part = parts_dir / f"part-{n:05d}.parquet"
        parts.append(part)
        if part.is_file():
            continue  # done before a kill
        pipe = pipe or load_pipeline(model, lora=lora, scheduler=scheduler, device=device, dtype=dtype)
        cols = sample_and_pair(
            pipe, recs, per_prompt=per_prompt, reward=reward, seed=seed, first_index=first,
            min_gap=min_gap, steps=steps, guidance=guidance, batch_size=batch_size,
        )  # fmt: skip
        tmp = part.with_name(part.name + ".tmp")
        write_columns(tmp, cols)
        os.replace(tmp, part)
    n_pairs = merge_parts(parts, out)
    summary = {**settings, "pairs": n_pairs, "out": str(out)}
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return summary
