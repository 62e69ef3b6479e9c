"""A denoiser on its own, as xdpo's loaders run it: for swapping a checkpoint's into a loaded pipeline.

`load_denoiser(folder)`: the `unet/` or `transformer/` of a pipeline folder, a checkpoint or a run's
`final/`, with the diffusers class its config.json names, in eval mode and prepared.
`prepare_denoiser(model)`: what the training step (`families.sd3.predict`) and the pipeline loader
(`evaluate.sample.load_pipeline`) do to a denoiser before running it: an SD3 transformer attends to its
zero context padding once (`xdpo.models.padding`; exact, so a no-op where the context has no zero run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdpo.errors import DataError

DENOISER_FOLDERS = ("unet", "transformer")  # the component names of diffusers' denoisers


def prepare_denoiser(model: Any) -> Any:
    """`model`, made to run as xdpo's loaders run it (idempotent); see the module docstring."""
    from diffusers import SD3Transformer2DModel

    if isinstance(model, SD3Transformer2DModel):
        from xdpo.models.padding import collapse_zero_padding

        collapse_zero_padding(model)
    return model


def load_denoiser(folder: str | Path) -> Any:
    """The denoiser `folder` holds (`unet/` or `transformer/`), loaded with the diffusers class its
    config.json names (UNet2DConditionModel, SD3Transformer2DModel, ...), eval mode, prepared."""
    import diffusers

    for sub in DENOISER_FOLDERS:
        config = Path(folder) / sub / "config.json"
        if config.is_file():
            cls = getattr(diffusers, json.loads(config.read_text())["_class_name"])
            return prepare_denoiser(cls.from_pretrained(config.parent).eval())
    raise DataError(f"{folder}: no unet/ or transformer/ folder with a config.json")
