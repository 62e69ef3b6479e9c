"""Evaluation plugins: modules that add scorers, prompt sets and named-model sampling defaults.

The registries (`scorers.SCORERS`, `prompts.PROMPT_SETS`, `sample.MODEL_SAMPLING`) import none of
their plugins; `load_plugins()` does, once, the first time a registry is read by name
(`xdpo.plugins.load_group` of the group `xdpo.plugins`):

- the built-in plugins of `BUILTIN_PLUGINS`, each "module" (registers on import) or
  "module:function" (the function is called with no arguments and registers);
- the shipped apps' plugins (`xdpo.apps.PLUGINS`): the digits world is one
  (`xdpo.apps.digits.evaluation:register`), so `xdpo.evaluate` never imports `xdpo.apps`;
- third-party plugins: entry points in the group `xdpo.plugins`, each naming such a function.

A plugin calls `register_scorer`, `register_prompt_set` and `register_sampling_defaults`.
A failing built-in or shipped plugin raises; a failing third-party plugin is skipped with a warning.
"""

from __future__ import annotations

from xdpo.plugins import load_group

GROUP = "xdpo.plugins"
BUILTIN_PLUGINS: tuple[str, ...] = (
    "xdpo.evaluate.rewards",  # pickscore, clip, aesthetic, imagereward
    "xdpo.evaluate.hps",  # hpsv2.0, hpsv2.1
    "xdpo.evaluate.prompt_sets",  # parti, hpsv2, pickapic-test
)


def load_plugins() -> list[str]:
    """Load every evaluation plugin once (later calls return at once); the specs loaded, in order."""
    return load_group(GROUP, BUILTIN_PLUGINS)
