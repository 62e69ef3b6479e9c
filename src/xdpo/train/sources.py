"""Where a run's batches come from: the latent cache, the dataset, or on-policy rounds.

Every source yields `Batch`es (one form, `xdpo.data.batch`) in the order `StepBatches` gives: a pure
function of (seed, step), so a resumed run reads exactly what an uninterrupted run would have read.
Online rounds (`online.enabled`) come from a round maker, the sampler protocol below: the recipe hands
it the current policy at each round's first step and reads the pairs file it returns; the maker itself
(sampling and scoring) lives above the training layer (`xdpo.rollout`), resolved by name.
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
from xdpo.train.online import round_pairs, stream

ROUND_MAKERS = {"pairs": "xdpo.rollout.rounds:PairRounds"}
"""Built-in round makers by kind, imported when a run needs one (the registry imports none of them)."""


class RoundMaker(Protocol):
    """Makes online round `r` from the current (unwrapped) policy; returns its pairs file."""

    def __call__(self, r: int, policy: Any) -> Path: ...


RoundFactory = Callable[[Any, Any, Any, Path], RoundMaker]  # (cfg, comps, accelerator, output_dir)


def default_rounds(kind: str = "pairs") -> RoundFactory:
    module, _, name = ROUND_MAKERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class TrainData:
    batches: Iterator[Batch]
    n_items: int  # usable pairs (or images) of the data, or of the current round
    about: str  # one line for the run's summary
    probe: Any  # the dataset the periodic reference's probe set is drawn from (online: round 0)


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

        def new_round(r: int) -> Any:
            data = round_pairs(cfg, rounds(r))
            accelerator.print(f"Online round {r}: {len(data)} pairs from the policy at step {r * o.every}")
            return data

        first = start_step // o.every
        data = new_round(first)
        probe = data if first == 0 else round_pairs(cfg, rounds(0))  # round files are kept: round 0 exists
        batches = stream(cfg, (first, data), new_round, lambda *a: loader(cfg, *a, rank, world), start_step)
        about = (
            f"online DPO: rounds of {o.every} steps, {o.per_prompt} images per prompt of "
            f"{o.prompts}, scored by {o.scorer}"
        )
        return TrainData(batches, len(data), about, probe)
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
