"""`train(cfg)`: run (or resume) a training run with the recipe (`recipe.Recipe`); the library's entry point.

A run stopped by SIGINT / SIGTERM has saved a checkpoint; `train` then raises `KeyboardInterrupt`, so that
a caller running several stages (the demo, the study, a script) stops with it; `Recipe.run` itself just
returns with `stopped` set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdpo.config import Config
from xdpo.train.recipe import Recipe


def train(cfg: Config, accelerator: Any = None, rounds: Any = None) -> Path:
    """Run (or resume) a training run; return `output_dir`. `rounds`: the online round maker's factory
    (default: online DPO's, `xdpo.rollout.rounds.PairRounds`)."""
    recipe = Recipe(cfg, accelerator, rounds)
    out = recipe.run()
    if recipe.stopped:
        raise KeyboardInterrupt
    return out
