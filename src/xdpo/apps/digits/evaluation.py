"""The digits world as an evaluation plugin: its scorers, prompt set and sampling defaults.

`register()` is listed in `xdpo.apps.PLUGINS` (group `xdpo.plugins`, which `xdpo.evaluate.plugins`
loads); it adds
- scorers `digits-reward` (the hidden ground-truth reward, `labeller.hidden_reward`: the `bold` task),
  `digits-reward-slant` (the `slant` task's, `tasks.slant_reward`) and
  `digits-alignment` (1 if the classifier reads the prompted digit, `labeller.alignment`);
- the prompt set `digits` (held-out evaluation captions, `data.eval_prompts`);
- sampling defaults for `--model digits` (`DIGITS_SAMPLING`: 25 DDIM steps, guidance 5) and
  `--model digits-flow` (`flow_sampling()`, from its xdpo_digits.json: 25 FlowMatchEuler steps, guidance 3.0).
Nothing heavy is imported until a scorer or the prompt set is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from xdpo.errors import XdpoError


def _details(fn_name: str, task: str = "bold", module: str = "labeller") -> str:
    """Function, xdpo version and a hash of the reward constants (a change invalidates cached scores)."""
    from xdpo import __version__
    from xdpo.apps.digits.tasks import get_task

    constants = get_task(task).constants()
    digest = hashlib.sha1(json.dumps(constants, sort_keys=True).encode()).hexdigest()[:8]
    return f"xdpo.apps.digits.{module}.{fn_name} (xdpo {__version__}, reward constants {digest})"


def digits_reward(device: str | None = None) -> Any:
    """The digits world's hidden ground-truth reward (the stand-in for human taste)."""
    from xdpo.apps.digits.labeller import hidden_reward
    from xdpo.evaluate.scorers import FunctionScorer

    return FunctionScorer("digits-reward", hidden_reward, _details("hidden_reward"), batch_size=256)


def digits_reward_slant(device: str | None = None) -> Any:
    """The `slant` task's true reward: legible and leaning right (`xdpo.apps.digits.tasks`)."""
    from xdpo.apps.digits.tasks import slant_reward
    from xdpo.evaluate.scorers import FunctionScorer

    details = _details("slant_reward", "slant", "tasks")
    return FunctionScorer("digits-reward-slant", slant_reward, details, batch_size=256)


def digits_alignment(device: str | None = None) -> Any:
    """1 if the digit classifier reads the prompted digit, else 0 (the digits analogue of CLIP score)."""
    from xdpo.apps.digits.labeller import alignment
    from xdpo.evaluate.scorers import FunctionScorer

    return FunctionScorer("digits-alignment", alignment, _details("alignment"), batch_size=256)


def eval_prompts() -> list[str]:
    """The held-out evaluation prompts (phrasings never seen in training)."""
    from xdpo.apps.digits.data import eval_prompts as prompts

    return prompts()


def register() -> None:
    """Register the digits scorers, the `digits` prompt set and `--model digits` / `digits-flow` sampling
    defaults (digits-flow's only where its folder is installed)."""
    from xdpo.apps.digits import DIGITS_SAMPLING, FLOW_BASE_DIR_NAME, flow_sampling
    from xdpo.evaluate.pipeline import register_sampling_defaults
    from xdpo.evaluate.prompts import register_prompt_set
    from xdpo.evaluate.scorers import register_scorer

    register_scorer("digits-reward")(digits_reward)
    register_scorer("digits-reward-slant")(digits_reward_slant)
    register_scorer("digits-alignment")(digits_alignment)
    register_prompt_set("digits", eval_prompts)
    register_sampling_defaults("digits", **DIGITS_SAMPLING)
    with contextlib.suppress(XdpoError, OSError, KeyError, ValueError):  # an install without digits-flow
        register_sampling_defaults(FLOW_BASE_DIR_NAME, **flow_sampling())
