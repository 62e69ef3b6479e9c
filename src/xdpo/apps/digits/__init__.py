"""The digits world: a Stable Diffusion in miniature on scikit-learn's handwritten digits (docs/design.md §5).

- `base_model_path()`: the shipped base `StableDiffusionPipeline` folder (src/xdpo/apps/digits/assets/digits-base).
- `labeller`: the hidden reward `hidden_reward`, `alignment`, `parse_digit`, Bradley-Terry labels.
- `data`: real digits, training and held-out evaluation captions.
- `pairs.make_pairs`: preference pairs sampled from the base, in the Pick-a-Pic v2 schema.
- `base.build_base`: the recipe that rebuilds the shipped base.
- `flow_base_model_path()`: the shipped flow-matching twin, a `StableDiffusion3Pipeline` folder
  (src/xdpo/apps/digits/assets/digits-flow, which shares digits-base's tokenizer and VAE files: the
  complete folder is assembled once in the user cache, `assets.pipeline_folder`), rebuilt by
  `flow_base.build_flow_base` (scripts/build_digits_flow.sh).
- `digits_sampling(model)`: how a digits-world model samples (`DIGITS_SAMPLING` for the UNet base and
  its fine-tunes, `flow_sampling()` for digits-flow and its fine-tunes).
- `register_named_models()`: the plugin that names them `digits` and `digits-flow` (`xdpo.models.named`).
This module imports neither torch nor diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdpo.errors import XdpoError

# Default sampling for the digits world: 25 DDIM steps (eta 0), classifier-free guidance 5.
DIGITS_SAMPLING = {"steps": 25, "guidance": 5.0, "scheduler": "ddim"}
BASE_DIR_NAME = "digits-base"
FLOW_BASE_DIR_NAME = "digits-flow"
FLOW_PIPELINE = "StableDiffusion3Pipeline"  # the class of digits-flow (and of its fine-tunes' final/)


def base_model_path() -> Path:
    """The shipped digits base pipeline folder; XdpoError if it is missing from the installation."""
    from xdpo.apps.digits.assets import ASSETS

    path = ASSETS / BASE_DIR_NAME
    if not (path / "model_index.json").is_file():
        raise XdpoError(
            f"the digits base model is missing ({path}/model_index.json not found): reinstall xdpo, "
            "or rebuild it with `xdpo digits build-base --out DIR` and pass `--model DIR`"
        )
    return path


def shipped_flow_base() -> Path:
    """The shipped digits-flow folder as stored (its own files and `xdpo_shared.json`); XdpoError if missing."""
    from xdpo.apps.digits.assets import ASSETS

    path = ASSETS / FLOW_BASE_DIR_NAME
    if not (path / "model_index.json").is_file():
        raise XdpoError(
            f"the digits flow base model is missing ({path}/model_index.json not found): reinstall xdpo, "
            "or rebuild it with `xdpo digits build-base --family flow --out DIR`"
        )
    return path


def flow_base_model_path() -> Path:
    """The flow-matching digits base as a complete `StableDiffusion3Pipeline` folder (assembled once from
    the shipped files, `assets.pipeline_folder`); XdpoError if missing."""
    from xdpo.apps.digits.assets import pipeline_folder

    return pipeline_folder(shipped_flow_base())


def flow_sampling(path: str | Path | None = None) -> dict[str, Any]:
    """digits-flow's sampling defaults, as its xdpo_digits.json records them (25 Euler steps, guidance 3.0);
    scheduler "default": the pipeline's own FlowMatchEulerDiscreteScheduler. `path`: a rebuilt flow base
    folder with its own xdpo_digits.json (default: the shipped one)."""
    record = Path(path) / "xdpo_digits.json" if path else None
    if record is None or not record.is_file():
        record = shipped_flow_base() / "xdpo_digits.json"  # read where it is stored (nothing assembled)
    rec = json.loads(record.read_text())["sampling"]
    return {"steps": int(rec["steps"]), "guidance": float(rec["guidance"]), "scheduler": "default"}


def digits_sampling(model: str | Path | None = None) -> dict[str, Any]:
    """Sampling defaults of a digits-world model: None / `digits` -> `DIGITS_SAMPLING`; `digits-flow` ->
    `flow_sampling()`; a folder by its pipeline class (a StableDiffusion3Pipeline folder, e.g. a
    fine-tune's final/, samples as digits-flow, anything else as the UNet base)."""
    if model is None or str(model) == "digits":
        return dict(DIGITS_SAMPLING)
    if str(model) == FLOW_BASE_DIR_NAME and not Path(model).exists():
        return flow_sampling()
    index = Path(model) / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return flow_sampling(model) if cls == FLOW_PIPELINE else dict(DIGITS_SAMPLING)


def pipeline_sampling(pipe: Any) -> dict[str, Any]:
    """`digits_sampling` of a loaded digits pipeline (by its class)."""
    return flow_sampling() if type(pipe).__name__ == FLOW_PIPELINE else dict(DIGITS_SAMPLING)


def register_named_models() -> None:
    """The plugin (group `xdpo.models`, listed in `xdpo.apps.PLUGINS`) that makes `model.pretrained=digits`
    and `digits-flow` resolve to the shipped folders."""
    from xdpo.models.named import register_named_model

    register_named_model("digits", base_model_path)
    register_named_model(FLOW_BASE_DIR_NAME, flow_base_model_path)


__all__ = [
    "BASE_DIR_NAME",
    "DIGITS_SAMPLING",
    "FLOW_BASE_DIR_NAME",
    "FLOW_PIPELINE",
    "base_model_path",
    "digits_sampling",
    "flow_base_model_path",
    "flow_sampling",
    "pipeline_sampling",
    "register_named_models",
    "shipped_flow_base",
]
