"""Objectives: one record per objective (`record.Objective`) in one registry (`registry.OBJECTIVES`);
losses as pure functions of per-sample errors; divergences (reward transforms) and outer losses."""

from xdpo.objectives.divergences import DIVERGENCES
from xdpo.objectives.kto import ReferencePoint, kto_images_loss, kto_loss
from xdpo.objectives.output import LossOutput
from xdpo.objectives.preference import OUTER_LOSSES, UNIT_LABEL_EXACT, preference_loss
from xdpo.objectives.record import LossInput, Objective
from xdpo.objectives.registry import OBJECTIVES, get_objective, objective_names, register_objective
from xdpo.objectives.sft import sft_loss

__all__ = [
    "DIVERGENCES",
    "OBJECTIVES",
    "OUTER_LOSSES",
    "UNIT_LABEL_EXACT",
    "LossInput",
    "LossOutput",
    "Objective",
    "ReferencePoint",
    "get_objective",
    "kto_images_loss",
    "kto_loss",
    "objective_names",
    "preference_loss",
    "register_objective",
    "sft_loss",
]
