"""Deterministic data order: which pairs (and augmentation seeds) each micro-batch of each process gets.

The run reads one global stream of pairs: position c = ((step * grad_accum + micro) * world + rank)
* batch_size + j, epoch = c // N, and pair = permutation_epoch[c % N] with a permutation seeded by
(seed, epoch). Any step's batch is therefore a pure function of (seed, step), so a resumed run reads
exactly what an uninterrupted run would have read, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across runs and processes)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> 1
    )


def batch_keys(
    n_pairs: int, *, seed: int, step: int, micro: int, grad_accum: int, rank: int, world: int, batch_size: int
) -> list[tuple[int, int]]:
    """(pair index, augmentation seed) for one micro-batch of one process."""
    first = ((step * grad_accum + micro) * world + rank) * batch_size
    keys = []
    for c in range(first, first + batch_size):
        epoch, pos = divmod(c, n_pairs)
        keys.append((int(_permutation(n_pairs, seed, epoch)[pos]), mix_seed(seed, c)))
    return keys


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler for a DataLoader: micro-batches of this process from `start_step` to `max_steps`."""

    def __init__(
        self,
        n_pairs: int,
        *,
        seed: int,
        start_step: int,
        max_steps: int,
        grad_accum: int,
        rank: int,
        world: int,
        batch_size: int,
    ) -> None:
        self.n_pairs, self.seed, self.start, self.stop = n_pairs, seed, start_step, max_steps
        self.grad_accum, self.rank, self.world, self.batch_size = grad_accum, rank, world, batch_size

    def __len__(self) -> int:
        return (self.stop - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            for micro in range(self.grad_accum):
                yield batch_keys(
                    self.n_pairs,
                    seed=self.seed,
                    step=step,
                    micro=micro,
                    grad_accum=self.grad_accum,
                    rank=self.rank,
                    world=self.world,
                    batch_size=self.batch_size,
                )
