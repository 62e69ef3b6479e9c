"""Validation during training, as the recipe sees it: when it is due, what a validator returns, the stop rule
on a held-out reward, and the best weights kept in `best/`.

The validator itself (sampling the family's pipeline with the current policy, scoring, the grids, the
report) lives above the training layer (`xdpo.rollout.validation`), reached through the protocol below
and resolved by name, as the online round makers are (`xdpo.train.sources.ROUND_MAKERS`).
Validation runs at step 0 (the base model), every `validation.every` steps and at the last step.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from xdpo.config import require

VALIDATORS = {"images": "xdpo.rollout.validation:ImageValidation"}
"""Built-in validators by kind, imported when a run validates (the registry imports none of them)."""
BEST = "best"
FOLDER, HISTORY = "validation", "history.jsonl"  # output_dir/validation/history.jsonl: one row per validation


@dataclass
class Validation:
    """One validation's outcome, the same on every process."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # logged to the trackers
    held_out: float | None = None  # the held-out scorer's mean reward, if one is configured
    history: list[float] = field(default_factory=list)  # the held-out rewards so far, this one last


class Validator(Protocol):
    """Samples, saves and scores the validation images of `policy` (unwrapped) at `step`."""

    def validate(self, step: int, policy: Any) -> Validation: ...


ValidatorFactory = Callable[[Any, Any, Any, Path, int], Validator]
"""(cfg, comps, accelerator, output_dir, the step the run starts from) -> a validator."""


def default_validator(kind: str = "images") -> ValidatorFactory:
    module, _, name = VALIDATORS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def check(cfg: Any) -> None:
    """A rule owner of `xdpo.config.rules`: what validation needs."""
    v = cfg.validation
    require(not v.stop_on or bool(v.held_out), "validation.stop_on", "needs validation.held_out", v.stop_on)
    require(not v.held_out or bool(v.prompts), "validation.held_out", "needs validation.prompts", v.held_out)
    require(
        not (v.prompts and cfg.data.cache),
        "validation.prompts",
        "samples images from prompts, which needs the text encoders that a data.cache run does not load",
        v.prompts,
    )


def due(cfg: Any, step: int) -> bool:
    return step == 0 or step % cfg.validation.every == 0 or step == cfg.train.max_steps


def watch(history: list[float], patience: int) -> tuple[bool, bool]:
    """(best, stop) after the newest held-out reward `history[-1]`: best when it exceeds every earlier one
    (the first is best); stop when `patience` > 0 validations in a row have stayed below the best."""
    if not history:
        return False, False
    top = max(range(len(history)), key=lambda i: (history[i], -i))  # the first of the highest
    since = len(history) - 1 - top
    return top == len(history) - 1, patience > 0 and since >= patience


def saved_step(folder: Path) -> int | None:
    """The step whose weights `folder` (a final-format folder) holds, from its xdpo.json."""
    try:
        return int(json.loads((folder / "xdpo.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ValidationRun:
    """Validation in a run: calls the validator when due, keeps the best held-out weights in `best/` (with
    `validation.stop_on`) and says when to stop. `save(folder, step)` writes final-format weights."""

    def __init__(self, cfg: Any, comps: Any, accelerator: Any, out: Path, start_step: int,
                 save: Callable[[Path, int], None], factory: ValidatorFactory | None = None) -> None:  # fmt: skip
        self.cfg, self.acc, self.out, self.save = cfg, accelerator, Path(out), save
        self.validator = (factory or default_validator())(cfg, comps, accelerator, self.out, start_step)
        best = self.out / BEST
        newer = (saved_step(best) or 0) > start_step
        if accelerator.is_main_process and newer:  # from checkpoints after the one resumed from
            shutil.rmtree(best, ignore_errors=True)
        self.last: Validation | None = None

    def __call__(self, step: int, policy: Any) -> bool:
        """Validate at `step` when due; True when `validation.stop_on` asks the run to stop."""
        if not due(self.cfg, step):
            return False
        v = self.cfg.validation
        self.last = res = self.validator.validate(step, self.acc.unwrap_model(policy))
        if self.cfg.train.report_to != "none" and self.acc.is_main_process and res.metrics:
            self.acc.log(res.metrics, step=step)
        if res.held_out is None or not v.stop_on:
            return False
        best, stop = watch(res.history, v.stop_on)
        if best:
            self.save(self.out / BEST, step)
        if stop:
            top = max(res.history)
            self.acc.print(
                f"xdpo train: validation.stop_on: the held-out reward ({v.held_out}) has stayed below its best "
                f"({top:.4g}, step {saved_step(self.out / BEST)}) for {v.stop_on} validations: stopping at step "
                f"{step}; the best weights are in {self.out / BEST}",
                flush=True,
            )
        return stop
