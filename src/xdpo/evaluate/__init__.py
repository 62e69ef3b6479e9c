"""Sampling, scoring, summary statistics and same-seed win rates (`xdpo sample|evaluate|compare`).

Scorers: the field's reward models (PickScore, CLIP, LAION aesthetic, ImageReward in rewards.py;
HPSv2/v2.1 in hps.py). Prompt sets: the papers' (prompt_sets.py). Both registries are filled by
plugins (plugins.py), among them the digits world's (`xdpo.apps.digits.evaluation`). One pipeline loader
and sampler (sample.py). Tables in the papers' shapes (tables.py).

Heavy imports (torch, diffusers, pandas) happen inside the functions, so importing this
package (e.g. to build the CLI) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PROMPT_SETS",
    "SCORERS",
    "Scorer",
    "bootstrap_ci",
    "compare_folders",
    "evaluate_folder",
    "generate",
    "load_pipeline",
    "load_plugins",
    "load_scorer",
    "load_scorers",
    "parse_weights",
    "resolve_prompt_records",
    "parse_seeds",
    "read_manifest",
    "register_prompt_set",
    "register_sampling_defaults",
    "register_scorer",
    "resolve_prompts",
    "sample_images",
    "score_folder",
    "summarize",
    "summary_markdown",
    "win_rate",
]

_WHERE = {
    "PROMPT_SETS": "prompts",
    "parse_seeds": "prompts",
    "register_prompt_set": "prompts",
    "resolve_prompts": "prompts",
    "resolve_prompt_records": "prompts",
    "load_scorer": "scorers",
    "parse_weights": "scorers",
    "compare_folders": "tables",
    "SCORERS": "scorers",
    "Scorer": "scorers",
    "load_scorers": "scorers",
    "register_scorer": "scorers",
    "bootstrap_ci": "stats",
    "summarize": "stats",
    "win_rate": "stats",
    "read_manifest": "sample",
    "sample_images": "sample",
    "generate": "sample",
    "load_pipeline": "sample",
    "register_sampling_defaults": "sample",
    "load_plugins": "plugins",
    "evaluate_folder": "evaluate",
    "score_folder": "evaluate",
    "summary_markdown": "evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"xdpo.evaluate.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'xdpo.evaluate' has no attribute {name!r}")
