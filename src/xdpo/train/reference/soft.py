"""The decoupled online methods' soft update of their old / EMA policy (docs/math.md §11.5).

After optimizer step i, every `update_every` steps:

    ref <- eta_i ref + (1 - eta_i) policy,      eta_i = min(soft_rate * i, soft_max)

DiffusionNFT's sampling policy theta_old (App. C: eta_i = min(0.001 i, 0.5); eta = 0 fully on-policy,
eta -> 1 nearly offline), AWM's "ema" copy (min(0.001 i, 0.3)) and DGPO's online model theta^-
(min(0.001 i, 0.3)) all follow this schedule, counted in optimizer steps. With LoRA the adapter factors
A and B are averaged separately, as the three authors' codes do (which is not the average of the
products B A that `ema` refuses to approximate); with a full fine-tune the weights themselves, in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xdpo.train.reference.strategy import Strategy


def soft_decay(step: int, rate: float, cap: float) -> float:
    """eta_i = min(rate * i, cap)."""
    return min(rate * step, cap)


class Soft(Strategy):
    moves = saves = full_precision = True
    probes = False  # no guard and no distances: the probe set would be encoded for nothing

    def update(self, step: int, storage: Any, check: Callable[[], tuple[float, float]]) -> float | None:
        storage.blend(1.0 - soft_decay(step, self.cfg.soft_rate, self.cfg.soft_max))
        self.updates += 1
        return None
