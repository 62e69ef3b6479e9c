"""Online rounds as training data: where round r's pairs file lives, how the run reads it, and the stream of
micro-batches across rounds. Round r covers optimizer steps [r * E, (r + 1) * E), E = `online.every`;
the round maker (`xdpo.rollout.rounds`) writes `output_dir/online/round-NNNN.parquet` from the policy at the
round's first step; the files are kept, so a resumed run trains on exactly the pairs it had."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def round_file(out: Path, r: int) -> Path:
    return out / "online" / f"round-{r:04d}.parquet"


def round_pairs(cfg: Any, path: Path) -> Any:
    """Round pairs as a PreferencePairs dataset with the run's data settings."""
    from xdpo.data import PreferencePairs, load_preference_table

    d = cfg.data
    return PreferencePairs(
        load_preference_table(str(path)), resolution=d.resolution, ties=d.ties, flip=d.flip,
        random_crop=d.random_crop, prompt_dropout=d.prompt_dropout, source=str(path),
    )  # fmt: skip


def stream(cfg: Any, first: tuple[int, Any], make: Any, loader: Any, start_step: int) -> Any:
    """Micro-batches from `start_step` to the end, round by round: round r's pairs come from `make(r)`
    (called when the round's first batch is needed, i.e. with the policy as it is then), read in the
    order `loader(pairs, seed, start, stop)` gives (a pure function of the round's seed and local step)."""
    from xdpo.train.batches import mix_seed

    every, total = cfg.online.every, cfg.train.max_steps
    r, pairs = first
    step = start_step
    while step < total:
        stop = min((r + 1) * every, total)
        yield from loader(pairs, mix_seed(cfg.seed, r), step - r * every, stop - r * every)
        step, r = stop, r + 1
        if step < total:
            pairs = make(r)
