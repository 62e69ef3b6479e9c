"""A round's rollouts as training items (the data kind "rollouts" of the objective record).

The round file (`xdpo.train.online`, written by `xdpo.rollout.rounds`) holds N = G x K images: their clean
latents, group, seed, raw scores, score and advantage, and the sampler's grid as training timestep
indices. A draw unit is an image, or a whole group when the objective shares one (t, eps) per group
(`noise="group"`: DGPO's micro-batches hold whole groups). Each unit is trained at the grid positions
`objective.timesteps(len(grid), params, rng)` gives for it (rng seeded by (seed, round, unit): the same
on every process and after a resume), one item per (unit, position); an objective without `timesteps`
has one item per unit and the step draws t from the run's sampler. Items are indexed by `(index, seed)`
keys, as the pair datasets, so the run's deterministic order (`xdpo.train.batches`) reads them.

A round sampled with a stochastic sampler (the likelihood objectives, `Objective.likelihood`) also holds
the recorded sampler steps (`sde_*`: the latents before and after each trained step, its log-probability,
the Gaussian's coefficients, the model timestep) and the guidance the pipeline ran (`cfg`): its items are
(unit, recorded step), every recorded step of every unit, and a batch's latents are the latents before
the step (`xdpo.train.likelihood_step`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.data.batch import Batch
from xdpo.errors import XdpoError
from xdpo.train.online import ROLLOUTS, read_record


class RolloutItems(torch.utils.data.Dataset):
    """Round `r`'s (unit, timestep) items of `folder` for `objective` with `params` (module docstring)."""

    fmt = "rollouts"

    def __init__(self, folder: Path, objective: Any, params: dict[str, Any], seed: int, r: int) -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder)
        record = read_record(self.folder)
        t = load_file(str(self.folder / ROLLOUTS))
        self.latents, self.advantage = t["latents"], t["advantage"].double()
        self.group, self.grid = t["group"].long(), t["grid_index"].long()
        self.captions, self.K = record["captions"], int(record["per_prompt"])
        self.pixel_size = tuple(record["pixel_size"])
        units = len(self.captions) if objective.noise == "group" else self.latents.shape[0]
        self.by_group = objective.noise == "group"
        self.sde = {k[4:]: v for k, v in t.items() if k.startswith("sde_")}
        self.cfg = float(record.get("cfg") or 0.0)
        items = []
        for u in range(units):
            if self.sde:
                items += [(u, s) for s in range(self.sde["x"].shape[1])]
                continue
            if objective.timesteps is None:
                items.append((u, -1))
                continue
            rng = np.random.default_rng([seed, r, u])
            items += [(u, int(self.grid[p])) for p in objective.timesteps(len(self.grid), params, rng)]
        if not items:
            raise XdpoError(f"online round {self.folder}: no rollouts to train on")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def images_of(self, unit: int) -> list[int]:
        return list(range(unit * self.K, (unit + 1) * self.K)) if self.by_group else [unit]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        unit, timestep = self.items[key[0]]
        return {"unit": unit, "images": self.images_of(unit), "timestep": timestep}

    def collate(self, items: list[dict[str, Any]]) -> Batch:
        """One micro-batch: the items' images in order, groups renumbered 0.. within the batch."""
        idx = [i for it in items for i in it["images"]]
        group = torch.tensor([u for u, it in enumerate(items) for _ in it["images"]], dtype=torch.long)
        steps = torch.tensor([it["timestep"] for it in items for _ in it["images"]], dtype=torch.long)
        captions = [self.captions[int(self.group[i])] for i in idx]
        if self.sde:
            return self.collate_steps(items, idx, group, captions)
        return Batch(
            captions=captions, label=torch.ones(len(idx)), pairs=False, pixel_size=self.pixel_size,
            latents=self.latents[idx], extras={"advantage": self.advantage[idx], "group": group, "timestep": steps},
            rows=torch.tensor(idx, dtype=torch.long),
        )  # fmt: skip

    def probe_images(self) -> list[int]:
        """The round's preferred images for a moving reference's probe (Kang et al.'s Eq. 8 reads preferred
        images): those scored above their group's mean (advantage > 0); all images when none is."""
        above = torch.nonzero(self.advantage > 0).flatten().tolist()
        return above or list(range(self.latents.shape[0]))

    def probe_batch(self, images: list[int]) -> Batch:
        """The clean samples `images` (not the recorded sampler steps) with their captions."""
        return Batch(
            captions=[self.captions[int(self.group[i])] for i in images], label=torch.ones(len(images)),
            pairs=False, pixel_size=self.pixel_size, latents=self.latents[images],
            rows=torch.tensor(images, dtype=torch.long),
        )  # fmt: skip

    def collate_steps(
        self, items: list[dict[str, Any]], idx: list[int], group: torch.Tensor, captions: list[str]
    ) -> Batch:
        """A micro-batch of recorded sampler steps: latents before the step, and its record in `extras`."""
        s = torch.tensor([it["timestep"] for it in items for _ in it["images"]], dtype=torch.long)
        i = torch.tensor(idx, dtype=torch.long)
        d = self.sde
        extras = {
            "advantage": self.advantage[idx], "group": group, "timestep": self.grid[d["position"][s]],
            "sde_next": d["next"][i, s], "sde_logp": d["logp"][i, s], "sde_a": d["a"][s], "sde_b": d["b"][s],
            "sde_std": d["std"][s], "sde_t": d["t"][s], "cfg": torch.full((len(idx),), self.cfg, dtype=torch.float64),
        }  # fmt: skip
        return Batch(
            captions=captions, label=torch.ones(len(idx)), pairs=False, pixel_size=self.pixel_size,
            latents=d["x"][i, s], extras=extras, rows=i,
        )  # fmt: skip
