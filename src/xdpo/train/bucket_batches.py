"""Deterministic data order within aspect-ratio buckets (`data.buckets`): every micro-batch holds pairs of
one bucket, and any step's batch is a pure function of (seed, step), as `batches.py`'s order.

Epoch e: the pairs of each bucket b in an order seeded by (seed, e, b), cut into micro-batches of
`batch_size` (a bucket's last batch filled up from its own first pairs), all the epoch's micro-batches then
shuffled by (seed, e). Micro-batch c = (step * grad_accum + micro) * world + rank of the run is number
c mod M of epoch c // M (M micro-batches per epoch); its j-th pair gets augmentation seed mix(seed, c, j).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

from xdpo.train.batches import mix_seed

EPOCH_SALT = 0xB0C4E7


@lru_cache(maxsize=2)
def epoch_batches(
    bucket_of: tuple[int, ...], batch_size: int, seed: int, epoch: int
) -> tuple[tuple[int, ...], ...]:
    """The micro-batches (pair indices) of one epoch, each within one bucket, in the epoch's order."""
    members = np.asarray(bucket_of)
    batches = []
    for b in np.unique(members):
        idx = np.flatnonzero(members == b)
        idx = idx[np.random.default_rng([seed, epoch, int(b)]).permutation(len(idx))]
        n = -(-len(idx) // batch_size) * batch_size
        idx = np.resize(idx, n)  # the last batch filled up from the bucket's first pairs
        batches += [tuple(int(i) for i in idx[k : k + batch_size]) for k in range(0, n, batch_size)]
    order = np.random.default_rng([seed, epoch, EPOCH_SALT]).permutation(len(batches))
    return tuple(batches[k] for k in order)


def bucket_batch_keys(
    bucket_of: tuple[int, ...], *, seed: int, step: int, micro: int, grad_accum: int, rank: int, world: int,
    batch_size: int,
) -> list[tuple[int, int]]:  # fmt: skip
    """(pair index, augmentation seed) for one micro-batch of one process."""
    c = (step * grad_accum + micro) * world + rank
    first = epoch_batches(bucket_of, batch_size, seed, 0)
    epoch, pos = divmod(c, len(first))
    batch = (first if epoch == 0 else epoch_batches(bucket_of, batch_size, seed, epoch))[pos]
    return [(i, mix_seed(seed, c, j)) for j, i in enumerate(batch)]


class BucketBatches(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: this process's micro-batches from `start_step` to `max_steps`, each
    within one bucket (`bucket_of[i]`: pair i's bucket)."""

    def __init__(
        self, bucket_of: np.ndarray, *, seed: int, start_step: int, max_steps: int, grad_accum: int,
        rank: int, world: int, batch_size: int,
    ) -> None:  # fmt: skip
        self.bucket_of = tuple(int(b) for b in bucket_of)
        self.seed, self.start, self.stop = seed, start_step, max_steps
        self.grad_accum, self.rank, self.world, self.batch_size = grad_accum, rank, world, batch_size

    def __len__(self) -> int:
        return (self.stop - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            for micro in range(self.grad_accum):
                yield bucket_batch_keys(
                    self.bucket_of, seed=self.seed, step=step, micro=micro, grad_accum=self.grad_accum,
                    rank=self.rank, world=self.world, batch_size=self.batch_size,
                )  # fmt: skip
