"""Online rounds as training data: where round r lives, how the run reads it, and the stream of micro-batches
across rounds. Round r covers optimizer steps [r * E, (r + 1) * E), E = `online.every`; the round maker
(`xdpo.rollout.rounds`) writes the folder `output_dir/online/round-NNNN/` from the model at the round's
first step, atomically (a complete folder or none):
- `round.json`: the round's record: groups (captions, prompt indices, seeds), reward parts and their
  weights, the normalisation, timings (images per second) and the monitors (held-out reward, diversity,
  drift), with `stop` set when `online.stop_on` ends the run before training on it;
- online DPO (`pairs.parquet`): best-vs-worst pairs of each group in the Pick-a-Pic schema;
- rollouts (`rollouts.safetensors`, read by `xdpo.train.rollouts`): every image's clean latents, seed,
  group, raw scores, score and advantage, and the sampler's grid as training timestep indices.
The folders are kept, so a resumed run trains on exactly the rounds it had (resume is exact across rounds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROUNDS, RECORD, PAIRS, ROLLOUTS = "online", "round.json", "pairs.parquet", "rollouts.safetensors"


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / ROUNDS / f"round-{r:04d}"


def read_record(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / RECORD).read_text())


def round_pairs(cfg: Any, path: Path) -> Any:
    """Round pairs as a PreferencePairs dataset with the run's data settings."""
    from xdpo.data import PreferencePairs, load_preference_table

    d = cfg.data
    return PreferencePairs(
        load_preference_table(str(path)), resolution=d.resolution, ties=d.ties, flip=d.flip,
        random_crop=d.random_crop, prompt_dropout=d.prompt_dropout, source=str(path),
    )  # fmt: skip


def round_data(cfg: Any, folder: Path, r: int) -> Any:
    """Round r's training items: its pairs (online DPO) or its rollouts (`xdpo.train.rollouts`)."""
    folder = Path(folder)
    if (folder / PAIRS).is_file():
        return round_pairs(cfg, folder / PAIRS)
    from xdpo.objectives import get_objective
    from xdpo.train.rollouts import RolloutItems
    from xdpo.train.setup import objective_params

    objective = get_objective(cfg.loss.objective)
    return RolloutItems(folder, objective, objective_params(cfg, objective), cfg.seed, r)


def stream(cfg: Any, first: tuple[int, Any], make: Any, loader: Any, start_step: int) -> Any:
    """Micro-batches from `start_step` to the end, round by round: round r's items come from `make(r)`
    (called when the round's first batch is needed, i.e. with the policy as it is then), read in the
    order `loader(items, seed, start, stop)` gives (a pure function of the round's seed and local step)."""
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
