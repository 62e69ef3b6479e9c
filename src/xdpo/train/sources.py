"""Where a run's batches come from: the latent cache, the dataset, or on-policy rounds.

Every source yields `Batch`es (one form, `xdpo.data.batch`) in the order `StepBatches` gives: a pure
function of (seed, step), so a resumed run reads exactly what an uninterrupted run would have read.
Online rounds (`online.enabled`) come from a round maker, the sampler protocol below: the recipe hands
it the current policy at each round's first step and reads the round folder it returns (pairs for
online DPO, rollouts for objectives that train on them: `xdpo.train.online`); the maker itself
(sampling and scoring) lives above the training layer (`xdpo.rollout`), resolved by the data kind the
objective record trains on. `TrainData.stop_before(step)` makes a round due at `step` before the step
runs and returns why the run should stop there (`online.stop_on`), else None.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from xdpo.data.batch import Batch
from xdpo.errors import XdpoError
from xdpo.train.batches import StepBatches
from xdpo.train.bucket_batches import BucketBatches
from xdpo.train.online import read_record, round_data, stream

ROUND_MAKERS = {"pairs": "xdpo.rollout.rounds:PairRounds", "rollouts": "xdpo.rollout.rounds:RolloutRounds"}
"""Built-in round makers by the data kind they make, imported when a run needs one (the registry imports
none of them)."""


class RoundMaker(Protocol):
    """Makes online round `r` from the current (unwrapped) policy; returns its folder."""

    def __call__(self, r: int, policy: Any) -> Path: ...


RoundFactory = Callable[..., RoundMaker]  # (cfg, comps, accelerator, output_dir, reference=...)


def round_kind(objective: Any) -> str:
    """The data an objective's online rounds make: rollouts if it trains on them, else pairs."""
    return "rollouts" if "rollouts" in objective.data else "pairs"


def default_rounds(objective: Any = None) -> RoundFactory:
    """The built-in round maker for `objective`'s data kind (online DPO's pairs without one)."""
    module, _, name = ROUND_MAKERS["pairs" if objective is None else round_kind(objective)].partition(":")
    return getattr(importlib.import_module(module), name)


def _never(step: int) -> str | None:
    return None


@dataclass
class TrainData:
    batches: Iterator[Batch]
    n_items: int  # usable pairs (or images) of the data, or of the current round
    about: str  # one line for the run's summary
    probe: Any  # the dataset the periodic reference's probe set is drawn from (online: round 0)
    stop_before: Callable[[int], str | None] = _never  # why to stop before a step (online.stop_on), or None


def loader(cfg: Any, data: Any, seed: int, start: int, stop: int, rank: int, world: int) -> Iterator[Batch]:
    """This process's micro-batches of `data` for optimizer steps [start, stop)."""
    t = cfg.train
    kw = dict(seed=seed, start_step=start, max_steps=stop, grad_accum=t.grad_accum, rank=rank, world=world,
              batch_size=t.batch_size)  # fmt: skip
    bucket_of = getattr(data, "bucket_of", None)  # data.buckets: micro-batches within a bucket
    sampler = StepBatches(len(data), **kw) if bucket_of is None else BucketBatches(bucket_of, **kw)
    return iter(
        torch.utils.data.DataLoader(
            data, batch_sampler=sampler, collate_fn=data.collate, num_workers=cfg.data.num_workers
        )
    )


def open_train_data(
    cfg: Any, family: Any, accelerator: Any, start_step: int, rounds: Callable[[int], Path] | None
) -> TrainData:
    """The run's batches from `start_step` to `train.max_steps`, on this process."""
    from xdpo.data import open_data
    from xdpo.data.cache_reader import open_cache

    rank, world, o = accelerator.process_index, accelerator.num_processes, cfg.online
    if o.enabled:
        if rounds is None:
            raise XdpoError("online.enabled: this run was started without a round maker (see xdpo.rollout)")
        made: dict[int, Any] = {}

        def get(r: int) -> Any:
            """Round r's items, made (or reused) once; only the newest round is kept in memory."""
            if r not in made:
                made.clear()
                made[r] = round_data(cfg, rounds(r), r)
                accelerator.print(
                    f"Online round {r}: {len(made[r])} {made[r].fmt} items from the policy at step {r * o.every}"
                )
            return made[r]

        def stop_before(step: int) -> str | None:
            if step % o.every or step >= cfg.train.max_steps:
                return None
            get(step // o.every)
            return read_record(rounds(step // o.every)).get("stop")

        first = start_step // o.every
        data = get(first)
        probe = (
            data if first == 0 else round_data(cfg, rounds(0), 0)
        )  # round folders are kept: round 0 exists
        batches = stream(cfg, (first, data), get, lambda *a: loader(cfg, *a, rank, world), start_step)
        about = (
            f"online: rounds of {o.every} steps, {o.per_prompt} images per prompt of {o.prompts}, scored by "
            f"{o.scorer}"
        )
        return TrainData(batches, len(data), about, probe, stop_before)
    if cfg.data.cache:  # posteriors and conditions written by `xdpo cache`, checked against this config
        data = open_cache(cfg, family)
        accelerator.print(f"Latents and text conditions from the cache {cfg.data.cache}")
    else:
        with accelerator.main_process_first():  # tar indexes and streamed subsets are built once
            _, data, _ = open_data(cfg)
    if len(data) == 0:
        raise XdpoError(f"data.path: {cfg.data.path} has no usable pairs ({data.n_ties} ties dropped)")
    about = f"{len(data)} pairs from {cfg.data.path} ({data.n_ties} ties, {data.n_dropped} dropped)"
    return TrainData(
        loader(cfg, data, cfg.seed, start_step, cfg.train.max_steps, rank, world), len(data), about, data
    )
