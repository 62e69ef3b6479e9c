"""The `checkpoints` reference: a previous checkpoint of the policy, drawn from a pool of candidates (SePPO's
reference-model selection, Zhang et al. 2024, arXiv 2410.05255v1 §4.1; docs/math.md §13).

The pool holds the initial model and up to K policy checkpoints: after every `save_every`-th optimizer step
the policy joins it (the oldest saved one leaves past K). Every `resample_every` steps (and whenever the
pool grows) one candidate becomes the reference, by `select`:
- random: uniform over the pool (the paper's strategy: "expands the exploration in the policy space");
- latest: the newest candidate (the iterative-DPO / SPIN choice the paper compares against);
- initial: the initial model throughout (Diffusion-DPO's reference, the paper's other baseline).
The draw is a pure function of (seed, step), so a resumed run draws what an uninterrupted one would.
The settings are the objective's own section (`seppo.select`, `seppo.save_every`, `seppo.keep`,
`seppo.resample_every`). Candidates are written once to `output_dir/reference-candidates/step-NNNNNNN
.safetensors` (LoRA: the adapter weights; full fine-tune: the denoiser's weights, in the reference's dtype),
read back when drawn; the checkpoint keeps the current reference's weights and the pool's steps (exact
resume: the files stay in the run folder).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import XdpoError
from xdpo.train.reference.strategy import Strategy, only_stable

FOLDER = "reference-candidates"
INITIAL = 0  # the initial model's "step" in the pool


def candidate_path(out: Path, step: int) -> Path:
    return Path(out) / FOLDER / f"step-{step:07d}.safetensors"


def draw(select: str, pool: list[int], seed: int, step: int) -> int:
    """The candidate (a step; 0 = the initial model) that becomes the reference after optimizer step `step`."""
    if select == "initial":
        return INITIAL
    if select == "latest":
        return pool[-1]
    from xdpo.train.batches import mix_seed

    return random.Random(mix_seed(seed, step, 0x5E990)).choice(pool)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class Checkpoints(Strategy):
    moves = saves = True
    probes = False  # no guard: the pool's draws need no probe set

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.pool: list[int] = [INITIAL]
        self.current = INITIAL
        self.out: Path | None = None
        self.select, self.save_every, self.keep, self.resample_every = "random", 30, 7, 1

    @staticmethod
    def check(cfg: Any) -> None:
        from xdpo.config import require

        only_stable(cfg)
        section = getattr(cfg, cfg.loss.objective, None)
        require(
            all(hasattr(section, k) for k in ("select", "save_every", "keep", "resample_every")),
            "reference.strategy",
            f"checkpoints reads select, save_every, keep and resample_every from the objective's section, and "
            f"loss.objective={cfg.loss.objective} declares none (loss.objective=seppo does)",
            cfg.reference.strategy,
        )

    def bind(self, cfg: Any) -> None:
        section = getattr(cfg, cfg.loss.objective)
        self.out = Path(cfg.output_dir)
        self.select, self.save_every = section.select, section.save_every
        self.keep, self.resample_every = section.keep, section.resample_every

    def due(self, step: int) -> bool:
        return step % self.save_every == 0 or step % self.resample_every == 0

    def update(self, step: int, storage: Any, check: Callable[..., Any]) -> float | None:
        grew = step % self.save_every == 0
        if grew:
            self.add(step, storage)
        if grew or step % self.resample_every == 0:
            self.use(draw(self.select, self.pool, getattr(check, "seed", 0), step), storage)
        return None

    def add(self, step: int, storage: Any) -> None:
        """The policy as candidate `step`: its weights through the reference storage, written once."""
        from safetensors.torch import save_file

        saved = storage.backup()
        storage.blend(1.0)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in storage.tensors().items()}
        storage.restore(saved)
        if _rank() == 0:
            path = candidate_path(self.out, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)
        _barrier()
        self.pool = [INITIAL, *[s for s in self.pool if s != INITIAL and s != step], step]
        if len(self.pool) - 1 > self.keep:
            self.pool = [INITIAL, *self.pool[-self.keep :]]
        self.updates += 1

    def use(self, chosen: int, storage: Any) -> None:
        """Make candidate `chosen` the reference (nothing to do if it already is)."""
        if chosen == self.current:
            return
        if chosen == INITIAL:
            storage.reset()
        else:
            from safetensors.torch import load_file

            path = candidate_path(self.out, chosen)
            if not path.is_file():
                raise XdpoError(
                    f"reference.strategy=checkpoints: candidate {path} is missing from the run folder"
                )
            storage.load(load_file(str(path)))
        self.current = chosen

    def state(self) -> dict[str, Any]:
        return {**super().state(), "pool": list(self.pool), "current": self.current}

    def load(self, state: dict[str, Any]) -> None:
        super().load(state)
        self.pool, self.current = list(state["pool"]), int(state["current"])

    def metrics(self, divergence: float | None) -> dict[str, Any]:
        return {"ref_checkpoint": self.current, "ref_candidates": len(self.pool), "ref_updates": self.updates}
