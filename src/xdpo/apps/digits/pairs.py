"""`make_pairs`: preference pairs from a digits model, labelled by the hidden labeller, Pick-a-Pic schema.

For pair i: a caption c_i drawn uniformly from `data.train_prompts()`, two images sampled from the model
(the shipped UNet base by default with DDIM, or `digits-flow` / any digits folder at its own sampling
defaults, `xdpo.apps.digits.digits_sampling`; own noise each), true rewards R0, R1 (the task's: `labeller.hidden_reward` for `bold`, `tasks.slant_reward` for `slant`), label_0 from
`labeller.bt_labels` at the task's labeller settings unless others are given.
Written with `xdpo.data.write_pairs_parquet` (PNG bytes in jpg_0/jpg_1) plus extra columns `reward_0`,
`reward_1` (hidden from training) and `digit`; a sidecar `<out>.json` records settings, seed, model and counts.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from xdpo.apps.digits import digits_sampling
from xdpo.apps.digits.data import prompt_digits, train_prompts
from xdpo.apps.digits.labeller import LabellerSettings, alignment, bt_labels
from xdpo.apps.digits.tasks import get_task
from xdpo.errors import DataError


def sidecar_path(out: str | Path) -> Path:
    """Where the settings and counts of a pairs file are recorded: ``<out>.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def make_pairs(
    out: str | Path,
    n: int,
    seed: int = 0,
    *,
    model: str | Path | None = None,
    settings: LabellerSettings | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 128,
    prompts: list[str] | None = None,
    progress: bool = True,
    parts: str | Path | None = None,
    task: str = "bold",
) -> dict:
    """Sample, label and write `n` pairs to `out` (parquet); return the sidecar record.

    `model`: None or `digits` (the shipped UNet base), `digits-flow`, or a pipeline folder; `steps` and
    `guidance` default to the model's own (`xdpo.apps.digits.digits_sampling`). `parts`: a folder keeping
    each finished batch of samples, so that an interrupted call resumes inside the sampling (removed when
    the pairs are written). `task`: the preference (`xdpo.apps.digits.tasks.TASKS`)."""
    from xdpo.apps.digits.sampling import generate, load_pipeline
    from xdpo.data import write_pairs_parquet
    from xdpo.evaluate.pipeline import resolve_model

    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    spec = get_task(task)
    settings = settings or spec.labeller
    model_path = resolve_model(model or "digits")
    defaults = digits_sampling(model)
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance"] if guidance is None else guidance
    t0 = time.time()
    rng = np.random.default_rng(seed)
    pool = prompts or train_prompts()
    captions = [pool[i] for i in rng.integers(0, len(pool), n)]
    pipe = load_pipeline(model_path, scheduler=defaults["scheduler"])
    # images 0 and 1 of a pair sit side by side, so each batch holds whole pairs
    images = generate(
        pipe,
        [c for c in captions for _ in range(2)],
        seed=seed,
        steps=steps,
        guidance=guidance,
        batch_size=batch_size,
        progress=progress,
        desc="sampling pairs",
        chunks=parts,
    )
    im0, im1 = images[0::2], images[1::2]
    r0, r1 = spec.reward(im0, captions), spec.reward(im1, captions)
    lab = bt_labels(r0, r1, settings, rng)
    digits = prompt_digits(captions).tolist()
    path = write_pairs_parquet(
        out,
        captions,
        im0,
        im1,
        lab.label_0.tolist(),
        extra={"reward_0": r0.tolist(), "reward_1": r1.tolist(), "digit": digits},
    )
    decided = ~lab.tie
    agree = (lab.label_0 == (r0 > r1).astype(float))[decided & (r0 != r1)]
    acc = np.concatenate([alignment(im0, captions), alignment(im1, captions)])
    record = {
        "file": str(path),
        "n_pairs": n,
        "seed": seed,
        "model": str(model_path),
        "sampling": {
            "steps": steps,
            "guidance": guidance,
            "scheduler": defaults["scheduler"],
            "scheduler_class": type(pipe.scheduler).__name__,
        },
        "task": task,
        "labeller": settings.to_dict(),
        "reward": spec.constants(),
        "counts": {
            "ties": int(lab.tie.sum()),
            "label_0_is_1": int((lab.label_0 == 1.0).sum()),
            "label_0_is_0": int((lab.label_0 == 0.0).sum()),
            "noise_flips": int(lab.flipped.sum()),
        },
        "tie_rate": float(lab.tie.mean()),
        "noise_flip_rate": float(lab.flipped[decided].mean()) if decided.any() else 0.0,
        "agreement_with_true_reward": float(agree.mean()) if agree.size else float("nan"),
        "mean_reward": float(np.mean(np.concatenate([r0, r1]))),
        "reward_gap_std": float(np.std(r0 - r1)),
        "prompt_accuracy": float(acc.mean()),
        "seconds": round(time.time() - t0, 1),
    }
    sidecar_path(path).write_text(json.dumps(record, indent=2) + "\n")
    if parts is not None:
        shutil.rmtree(parts, ignore_errors=True)
    return record
