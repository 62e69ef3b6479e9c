"""A round's groups: which prompts, which seeds, which process samples which group, and the scores gathered.

Group g is prompt `prompt_index[g]` of the prompt set; its image k is drawn at seed `seed + p * K + k`
(p = prompt_index[g], K images a group), so any image can be regenerated alone. Groups are dealt to
processes whole (group g to process g mod world): a group's K images are sampled and scored on one
process, then every process receives every group's raw scores (one gather of Python objects) and
computes the same scores and advantages over the whole round (`advantages.score_and_advantage`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xdpo.rollout.advantages import score_and_advantage
from xdpo.rollout.engine import Job, RolloutEngine, Samples, pipeline_calls
from xdpo.rollout.rewards import as_reward


@dataclass(frozen=True)
class RoundPlan:
    captions: tuple[str, ...]  # per group
    prompt_index: tuple[int, ...]  # per group: its prompt's index in the prompt set
    per_prompt: int
    seed: int
    shared_start: bool = False  # a group's images start from one initial noise (its first seed's; D3PO)

    @property
    def n_groups(self) -> int:
        return len(self.captions)

    def seed_of(self, g: int, k: int) -> int:
        return self.seed + self.prompt_index[g] * self.per_prompt + k

    def jobs(self, groups: Sequence[int]) -> list[Job]:
        K = self.per_prompt
        return [
            Job(
                self.captions[g],
                self.seed_of(g, k),
                group=g,
                index=g * K + k,
                start=self.seed_of(g, 0) if self.shared_start else None,
            )
            for g in groups
            for k in range(K)
        ]


def plan_round(
    records: Sequence[dict[str, Any]], per_prompt: int, seed: int, *, first_index: int = 0,
    prompts_per_round: int = 0, choose_seed: int = 0,
) -> RoundPlan:  # fmt: skip
    """Groups for `records` (prompt p has index first_index + p): all of them, or `prompts_per_round` drawn
    without replacement with a generator seeded by `choose_seed` (in prompt order)."""
    idx = list(range(len(records)))
    if 0 < prompts_per_round < len(records):
        idx = sorted(
            np.random.default_rng(choose_seed).choice(len(records), prompts_per_round, replace=False)
        )
    return RoundPlan(
        tuple(records[i]["prompt"] for i in idx), tuple(first_index + int(i) for i in idx), per_prompt, seed
    )


def my_groups(n_groups: int, rank: int, world: int) -> list[int]:
    """The groups process `rank` samples: g = rank, rank + world, ... (whole groups)."""
    return list(range(rank, n_groups, world))


def calls_per_process(n_groups: int, per_prompt: int, world: int, batch_images: int) -> int:
    """The most pipeline calls any process makes (every process makes as many where forwards are collectives)."""
    return max(
        pipeline_calls(len(my_groups(n_groups, r, world)) * per_prompt, batch_images) for r in range(world)
    )


@dataclass
class Scored:
    """One process's samples and the whole round's scores (every array over all N = groups x K images,
    ordered by image index g * K + k)."""

    groups: list[int]  # this process's groups
    jobs: list[Job]  # this process's images
    samples: Samples  # this process's images, latents and timing
    raw: np.ndarray  # [N, parts] raw scores of every reward part
    score: np.ndarray  # [N] the combined score that ranks a group's images
    advantage: np.ndarray  # [N] group advantages
    process: np.ndarray  # [N] the process that sampled each image
    seconds: list[float]  # per process: time in the pipeline

    def local_scores(self) -> np.ndarray:
        return self.score[[j.index for j in self.jobs]]


def sample_and_score(
    engine: RolloutEngine, plan: RoundPlan, reward: Any, *, rank: int = 0, world: int = 1,
    gather: Callable[[list], list] | None = None, pad_calls: bool = False, norm: str = "sum",
    std: str = "global",
) -> Scored:  # fmt: skip
    """Sample this process's groups, score them with `reward` (`rewards.Reward`), gather every group's raw
    scores, and compute scores and advantages over the round (module docstring)."""
    reward = as_reward(reward)
    mine = my_groups(plan.n_groups, rank, world)
    jobs = plan.jobs(mine)
    calls = (
        calls_per_process(plan.n_groups, plan.per_prompt, world, engine.batch_images) if pad_calls else None
    )
    samples = engine.sample(jobs, calls=calls)
    raw_local = reward.parts_scores(samples.images, [j.prompt for j in jobs])
    mine_rows = [(j.index, rank, raw_local[i].tolist()) for i, j in enumerate(jobs)]
    everyone = (gather or (lambda x: x))([(mine_rows, samples.seconds)])
    n = plan.n_groups * plan.per_prompt
    raw = np.zeros((n, len(reward.parts)))
    process = np.full(n, -1, dtype=np.int64)
    for rows, _ in everyone:
        for index, proc, values in rows:
            raw[index], process[index] = values, proc
    if (process < 0).any():
        raise RuntimeError(f"rollout: {int((process < 0).sum())} of {n} images were not gathered")
    group = np.arange(n) // plan.per_prompt
    score, adv = score_and_advantage(raw, reward.weights, group, norm=norm, std=std)
    return Scored(mine, jobs, samples, raw, score, adv, process, [sec for _, sec in everyone])
