"""The reference model of a run: a storage (LoRA adapters or weight copies, `storage.py`) and an update
strategy (frozen, periodic, ema: `strategy.py`) kept apart; built only when the objective needs one.

`periodic` (Kang et al. 2025's update, with a divergence guard on a probe set: `probe.py`) and `ema`
update every tau = `reference.update_every` optimizer steps; docs/math.md §6 has the formulas.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError
from xdpo.train.reference.probe import Probe
from xdpo.train.reference.storage import AdapterStorage, CopyStorage
from xdpo.train.reference.strategy import EMA, Frozen, Periodic, Strategy

STRATEGIES: dict[str, type[Strategy]] = {"frozen": Frozen, "periodic": Periodic, "ema": EMA}


def strategy_names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


class Reference:
    """The reference (and initial) model of a run and the state of its update strategy."""

    def __init__(
        self, cfg: Any, family: Any, model: Any, *, lora: bool, dtype: torch.dtype, device: torch.device
    ):
        if cfg.strategy not in STRATEGIES:
            raise ConfigError(
                f"reference.strategy: unknown {cfg.strategy!r} (choose from {', '.join(STRATEGIES)})"
            )
        self.cfg = cfg
        self.strategy = STRATEGIES[cfg.strategy](cfg)
        if lora:
            self.storage: Any = AdapterStorage(family, model)
        else:
            ref_dtype = torch.float32 if self.strategy.full_precision else dtype
            self.storage = CopyStorage(
                family, model, dtype=ref_dtype, device=device, moves=self.strategy.moves, offload=cfg.offload,
                place=getattr(cfg, "place", "device"),
            )  # fmt: skip
        self.probe: Probe | None = None

    @property
    def needs_probe(self) -> bool:
        return self.strategy.moves

    def set_sharded(self, sharded: bool) -> None:
        self.storage.sharded = sharded

    def predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The reference prediction (call under inference mode / no_grad)."""
        return self.storage.reference(noisy, t, cond)

    def initial_predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.storage.initial(noisy, t, cond)

    def policy_predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.storage.policy(noisy, t, cond)

    def estimate(self, step: int, seed: int, chunk: int) -> tuple[float, float]:
        """D and its standard error on the probe set (all processes)."""
        return self.probe.estimate(
            self.policy_predict, self.initial_predict, step=step, seed=seed, draws=self.cfg.probe_draws,
            chunk=chunk, estimator=self.cfg.divergence,
        )  # fmt: skip

    def maybe_update(self, step: int, seed: int, chunk: int = 8) -> float | None:
        """After optimizer step `step`: update per the strategy; return D when a check ran."""
        if not self.strategy.due(step):
            return None
        return self.strategy.update(step, self.storage, lambda: self.estimate(step, seed, chunk))

    def state(self) -> dict[str, Any]:
        return self.strategy.state()

    def tensors(self) -> dict[str, Tensor]:
        """Weights to save with a checkpoint (none for a frozen reference)."""
        return self.storage.tensors() if self.strategy.saves else {}

    def load(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.strategy.load(state)
        if self.strategy.saves:
            self.storage.load(tensors)

    def metrics(self, divergence: float | None) -> dict[str, Any]:
        return self.strategy.metrics(divergence)


__all__ = ["STRATEGIES", "Probe", "Reference", "strategy_names"]
