"""Objectives as pure functions of per-sample errors: divergences (reward transforms) and outer losses."""

from xdpo.objectives.divergences import DIVERGENCES
from xdpo.objectives.losses import (
    OBJECTIVES,
    OUTER_LOSSES,
    UNIT_LABEL_EXACT,
    LossOutput,
    kto_images_loss,
    kto_loss,
    objective_loss,
    preference_loss,
    sft_loss,
)

__all__ = [
    "DIVERGENCES",
    "OBJECTIVES",
    "OUTER_LOSSES",
    "UNIT_LABEL_EXACT",
    "LossOutput",
    "objective_loss",
    "preference_loss",
    "kto_loss",
    "kto_images_loss",
    "sft_loss",
]
