"""Losers the step makes itself (`Objective.losers`): the batch's preferred images against samples the
reference draws for their captions (SePPO). The sampler lives above the training layer
(`xdpo.rollout.reference_samples`), resolved by path when a run needs one.

Pairs keep their winners (the data's losers are not read); per-image data (`data.format=images`) are all
preferred images (a row labelled undesirable stops the run). One seed per caption comes from the step's
generator, so resume and any batching draw the same reference samples.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from xdpo.data.batch import Batch
from xdpo.data.encode import Encoded
from xdpo.errors import DataError, XdpoError

SAMPLERS = {"reference": "xdpo.rollout.reference_samples:ReferenceSampler"}
"""Loser samplers by the `Objective.losers` value that needs them (imported when a run needs one)."""

LoserSampler = Callable[[list[str], list[int]], Tensor]


def loser_sampler(objective: Any, cfg: Any, comps: Any, reference: Any, **kw: Any) -> LoserSampler | None:
    """The sampler of `objective.losers` (None for "data": the batch's own losers)."""
    if objective.losers == "data":
        return None
    module, _, name = SAMPLERS[objective.losers].partition(":")
    return getattr(importlib.import_module(module), name)(cfg, comps, reference, **kw)


@contextmanager
def sampling_context(accelerator: Any, partitioned: bool) -> Iterator[None]:
    """No autograd (no_grad for partitioned models, whose gathered parameters must stay normal tensors;
    else inference mode) and the run's autocast, as the online rounds sample."""
    with (torch.no_grad if partitioned else torch.inference_mode)(), accelerator.autocast():
        yield


def with_sampled_losers(sampler: LoserSampler, batch: Batch, enc: Encoded, gen: torch.Generator) -> Encoded:
    """[winners; sampled losers] as pairs: the batch's preferred images and one sample per caption."""
    b = batch.groups
    if not batch.pairs and bool((batch.label < 1).any()):
        raise DataError(
            "data.format=images: a row labelled undesirable (label 0); loss.objective samples its own losers "
            "and trains on preferred images only: keep the rows labelled 1"
        )
    seeds = torch.randint(0, 2**31 - 1, (b,), generator=gen, device=gen.device).tolist()
    winners = enc.latents[:b]
    losers = sampler(list(batch.captions), seeds).to(winners.device, torch.float32)
    if losers.shape != winners.shape:
        raise XdpoError(
            f"reference samples have latents {tuple(losers.shape[1:])}, the data {tuple(winners.shape[1:])}: "
            "sample and train at the same data.resolution"
        )
    cond = {k: torch.cat([v[:b], v[:b]]) for k, v in enc.cond.items()}
    return Encoded(torch.cat([winners, losers]), cond, pairs=True)
