"""Evaluation plugins: modules that add scorers, prompt sets and named-model sampling defaults.

The registries (`scorers.SCORERS`, `prompts.PROMPT_SETS`, `sample.MODEL_SAMPLING`) import none of
their plugins; `load_plugins()` does, once, the first time a registry is read by name:

- the built-in plugins of `BUILTIN_PLUGINS`, each "module" (registers on import) or
  "module:function" (the function is called with no arguments and registers);
- third-party plugins: entry points in the group `xdpo.plugins`, each naming such a function.

A plugin calls `register_scorer`, `register_prompt_set` and `register_sampling_defaults`. The digits
world is one (`xdpo.apps.digits.evaluation:register`), so `xdpo.evaluate` never imports `xdpo.apps.digits`.
A failing built-in plugin raises; a failing third-party plugin is skipped with a warning.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

GROUP = "xdpo.plugins"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "xdpo.evaluate.rewards",  # pickscore, clip, aesthetic, imagereward
    "xdpo.evaluate.hps",  # hpsv2.0, hpsv2.1
    "xdpo.evaluate.prompt_sets",  # parti, hpsv2, pickapic-test
    "xdpo.apps.digits.evaluation:register",  # digits-reward, digits-alignment, --prompts digits, --model digits
)

_loaded: list[str] = []
_state = {"done": False, "loading": False}


def _run(spec: str) -> None:
    module, _, function = spec.partition(":")
    loaded = importlib.import_module(module)
    if function:
        getattr(loaded, function)()


def load_plugins() -> list[str]:
    """Load every plugin once (later calls return at once); the specs loaded, in order."""
    if _state["done"] or _state["loading"]:  # loading: a plugin that reads a registry does not recurse
        return list(_loaded)
    _state["loading"] = True
    try:
        for spec in BUILTIN_PLUGINS:
            if spec not in _loaded:
                _run(spec)
                _loaded.append(spec)
        for ep in entry_points(group=GROUP):
            try:
                ep.load()()
            except Exception as e:  # a broken third-party plugin must not take the CLI down
                warnings.warn(f"xdpo plugin {ep.name} ({ep.value}) failed to load: {e}", stacklevel=2)
                continue
            _loaded.append(ep.value)
        _state["done"] = True
    finally:
        _state["loading"] = False
    return list(_loaded)
