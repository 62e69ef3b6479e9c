"""The objectives, by the name `loss.objective` takes: one line per objective (its record lives in its module)."""

from __future__ import annotations

from xdpo.errors import ConfigError
from xdpo.objectives.awm import AWM
from xdpo.objectives.d3po import D3PO
from xdpo.objectives.dgpo import DGPO
from xdpo.objectives.dpok import DPOK
from xdpo.objectives.grpo import GRPO
from xdpo.objectives.kto import KTO
from xdpo.objectives.mapo import MAPO
from xdpo.objectives.nft import NFT
from xdpo.objectives.preference import PAIR
from xdpo.objectives.record import Objective
from xdpo.objectives.seppo import SEPPO
from xdpo.objectives.sft import SFT

OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (PAIR, SFT, KTO, MAPO, NFT, AWM, DGPO, GRPO, DPOK, D3PO, SEPPO)
}


def objective_names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"loss.objective: unknown objective {name!r} (choose from {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def register_objective(objective: Objective) -> None:
    """Add an objective (a plugin's, or a test's); its name must be new."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
