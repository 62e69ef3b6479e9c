"""The digits world: a Stable Diffusion in miniature on scikit-learn's handwritten digits (docs/design.md §5).

- `base_model_path()`: the shipped base `StableDiffusionPipeline` folder (src/xdpo/assets/digits-base).
- `labeller`: the hidden reward `hidden_reward`, `alignment`, `parse_digit`, Bradley-Terry labels.
- `data`: real digits, training and held-out evaluation captions.
- `pairs.make_pairs`: preference pairs sampled from the base, in the Pick-a-Pic v2 schema.
- `base.build_base`: the recipe that rebuilds the shipped base.
- `flow_base_model_path()`: the shipped flow-matching twin, a `StableDiffusion3Pipeline` folder
  (src/xdpo/assets/digits-flow), rebuilt by `flow_base.build_flow_base`.
This module imports neither torch nor diffusers.
"""

from __future__ import annotations

from pathlib import Path

from xdpo.errors import XdpoError

# Default sampling for the digits world: 25 DDIM steps (eta 0), classifier-free guidance 5.
DIGITS_SAMPLING = {"steps": 25, "guidance": 5.0, "scheduler": "ddim"}
BASE_DIR_NAME = "digits-base"
FLOW_BASE_DIR_NAME = "digits-flow"


def base_model_path() -> Path:
    """The shipped digits base pipeline folder; XdpoError if it is missing from the installation."""
    path = Path(__file__).resolve().parent.parent / "assets" / BASE_DIR_NAME
    if not (path / "model_index.json").is_file():
        raise XdpoError(
            f"the digits base model is missing ({path}/model_index.json not found): reinstall xdpo, "
            "or rebuild it with `xdpo digits build-base --out DIR` and pass `--model DIR`"
        )
    return path


def flow_base_model_path() -> Path:
    """The shipped flow-matching digits base (`StableDiffusion3Pipeline` folder); XdpoError if missing."""
    path = Path(__file__).resolve().parent.parent / "assets" / FLOW_BASE_DIR_NAME
    if not (path / "model_index.json").is_file():
        raise XdpoError(
            f"the digits flow base model is missing ({path}/model_index.json not found): reinstall xdpo, "
            "or rebuild it with `xdpo digits build-base --family flow --out DIR`"
        )
    return path


__all__ = [
    "BASE_DIR_NAME",
    "DIGITS_SAMPLING",
    "FLOW_BASE_DIR_NAME",
    "base_model_path",
    "flow_base_model_path",
]
