"""The reference model of a run: a storage (LoRA adapters or weight copies, `storage.py`) and an update
strategy (frozen, periodic, ema: `strategy.py`; stable: `stable.py`) kept apart; built only when the
objective needs one.

`stable` (Kang et al. 2025's guarded update, with xdpo's soft blend and anchor), `periodic` (its earlier
form), `ema` and `soft` (the online methods' old policy, `soft.py`) update every tau =
`reference.update_every` optimizer steps; the guards read a probe set (`probe.py`); docs/math.md §6 and
§11.5 have the formulas and their sources.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError
from xdpo.train.reference.checkpoints import Checkpoints
from xdpo.train.reference.probe import Probe
from xdpo.train.reference.soft import Soft
from xdpo.train.reference.stable import Stable
from xdpo.train.reference.storage import AdapterStorage, CopyStorage
from xdpo.train.reference.strategy import EMA, Frozen, Periodic, Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    "frozen": Frozen, "stable": Stable, "periodic": Periodic, "ema": EMA, "soft": Soft,
    "checkpoints": Checkpoints,
}  # fmt: skip


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
        self.divergence = self.strategy.default_divergence if cfg.divergence == "auto" else cfg.divergence
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
        return self.strategy.moves and self.strategy.probes

    def bind(self, run_cfg: Any) -> None:
        """Let the strategy read the run's config beyond `reference.*` (its objective's section, the folder)."""
        self.strategy.bind(run_cfg)

    def set_sharded(self, sharded: bool) -> None:
        self.storage.sharded = sharded

    def predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The reference prediction (call under inference mode / no_grad)."""
        return self.storage.reference(noisy, t, cond)

    def sampling(self) -> Any:
        """A context holding the denoiser that samples as the reference (DiffusionNFT's old policy samples
        its rollouts): LoRA, the policy's own module with the reference's adapter weights in it (restored
        on exit); full fine-tune, the reference copy."""
        return self.storage.sampling()

    def initial_predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.storage.initial(noisy, t, cond)

    def policy_predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.storage.policy(noisy, t, cond)

    def estimate(self, step: int, seed: int, chunk: int, candidate: str = "policy") -> tuple[float, float]:
        """D of the policy (or of the reference: `candidate="reference"`) from the initial model and its
        standard error on the probe set (all processes)."""
        predict = self.policy_predict if candidate == "policy" else self.predict
        return self.probe.estimate(
            predict, self.initial_predict, step=step, seed=seed, draws=self.cfg.probe_draws, chunk=chunk,
            estimator=self.divergence,
        )  # fmt: skip

    def distances(self, step: int, seed: int, chunk: int) -> dict[str, float]:
        """pred_mse of the reference from the initial model (`initial`) and from the policy (`policy`)."""
        others = {"initial": self.initial_predict, "policy": self.policy_predict}
        return self.probe.distances(
            self.predict, others, step=step, seed=seed, draws=self.cfg.probe_draws, chunk=chunk
        )

    def maybe_update(self, step: int, seed: int, chunk: int = 8) -> float | None:
        """After optimizer step `step`: update per the strategy; return D when a check ran."""
        if not self.strategy.due(step):
            return None
        return self.strategy.update(step, self.storage, Checks(self, step, seed, chunk))

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


class Checks:
    """What a strategy may measure at an update step: calling it gives D of the policy (the candidate of a
    copy); `reference()` D of the reference (a staged candidate); `distances()` the reference's pred_mse
    from the initial model and the policy. All on the probe set, the same (t, eps) draws at one step."""

    def __init__(self, ref: Reference, step: int, seed: int, chunk: int) -> None:
        self.ref, self.step, self.seed, self.chunk = ref, step, seed, chunk

    def __call__(self) -> tuple[float, float]:
        return self.ref.estimate(self.step, self.seed, self.chunk)

    def reference(self) -> tuple[float, float]:
        return self.ref.estimate(self.step, self.seed, self.chunk, candidate="reference")

    def distances(self) -> dict[str, float]:
        return self.ref.distances(self.step, self.seed, self.chunk)


__all__ = ["STRATEGIES", "Checks", "Probe", "Reference", "strategy_names"]
