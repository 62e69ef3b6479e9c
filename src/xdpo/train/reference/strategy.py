"""Reference update strategies: what happens to the reference every `reference.update_every` steps.

Each strategy is a small class over a storage (`storage.py`): `moves` (the reference leaves the initial
model, so a full fine-tune keeps an initial copy for checks and resets), `saves` (its weights go into
checkpoints), `update(step, storage, check) -> D or None` (`check()`: D of the policy from the initial
model; `reference.Checks` has more), its guard's `default_divergence` (`reference.divergence: auto`), and
its counters as JSON state. New strategies subclass `Strategy` in a file of their own and add one line to
`STRATEGIES` (reference/__init__.py), as `stable.py` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Strategy:
    moves = False  # the reference leaves the initial model (a full fine-tune keeps an initial copy)
    saves = False  # its weights go into checkpoints
    full_precision = (
        False  # a full fine-tune's reference copy in fp32 (an EMA's small steps vanish in 16 bits)
    )
    default_divergence = "pred_mse"  # the guard's estimator under `reference.divergence: auto`
    probes = True  # a moving reference reads the probe set (its guard, its distances); False: never

    def bind(self, cfg: Any) -> None:
        """Read the run's config beyond `reference.*` (called once the reference is built)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.updates = 0
        self.frozen_step: int | None = None
        self.last_divergence: float | None = None
        self.last_se: float | None = None

    @staticmethod
    def check(cfg: Any) -> None:
        """The strategy's rules on the run config (one `ConfigError` line), checked before the run."""
        only_stable(cfg)

    def due(self, step: int) -> bool:
        return self.frozen_step is None and step % self.cfg.update_every == 0

    def update(self, step: int, storage: Any, check: Callable[[], tuple[float, float]]) -> float | None:
        return None

    def state(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "frozen_step": self.frozen_step,
            "last_divergence": self.last_divergence,
            "last_divergence_se": self.last_se,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.updates, self.frozen_step = state["updates"], state["frozen_step"]
        self.last_divergence = state.get("last_divergence")
        self.last_se = state.get("last_divergence_se")

    def metrics(self, divergence: float | None) -> dict[str, Any]:
        return {
            "ref_divergence": divergence,
            "ref_divergence_se": self.last_se if divergence is not None else None,
            "ref_updates": self.updates,
            "ref_frozen_step": self.frozen_step,
        }


def only_stable(cfg: Any) -> None:
    """`reference.alpha` and `reference.anchor` are the stable strategy's: elsewhere they would do nothing."""
    from xdpo.config import require

    r = cfg.reference
    for key, value, default in (("alpha", r.alpha, 1.0), ("anchor", r.anchor, 0.0)):
        require(value == default, f"reference.{key}", f"is read by reference.strategy=stable only (here "
                f"{r.strategy}); leave it at {default:g}", value)  # fmt: skip


class Frozen(Strategy):
    """The initial model throughout (Diffusion-DPO)."""

    def due(self, step: int) -> bool:
        return False


class Periodic(Strategy):
    """Every tau steps the policy becomes the reference if its divergence D from the initial model on the
    probe set is at most delta (`max_divergence`); past delta the reference freezes for the rest of the run
    (`on_exceed: freeze`) or resets to the initial model (`reinit`, checks continue)."""

    moves = saves = True

    def update(self, step: int, storage: Any, check: Callable[[], tuple[float, float]]) -> float | None:
        d, self.last_se = check()
        self.last_divergence = d
        if d <= self.cfg.max_divergence:
            storage.blend(1.0)
            self.updates += 1
        elif self.cfg.on_exceed == "freeze":
            self.frozen_step = step
        else:
            storage.reset()
        return d


class EMA(Strategy):
    """ref <- decay ref + (1 - decay) policy every tau steps (Diffusion-KTO's reference EMA)."""

    saves = full_precision = True

    @staticmethod
    def check(cfg: Any) -> None:
        from xdpo.config import require

        only_stable(cfg)
        require(
            cfg.model.lora_rank <= 0,
            "reference.strategy",
            "ema with LoRA would average the factors A and B separately, which is not an average of the "
            "weights B A; use periodic, or a full fine-tune (model.lora_rank=0)",
            cfg.reference.strategy,
        )

    def update(self, step: int, storage: Any, check: Callable[[], tuple[float, float]]) -> float | None:
        storage.blend(1.0 - self.cfg.ema_decay)
        self.updates += 1
        return None
