"""A denoiser on its own, for swapping a checkpoint's into a loaded pipeline.

`load_denoiser(folder)`: the denoiser (`unet/`, `transformer/`: the families' denoiser components) of a
pipeline folder, a checkpoint or a run's `final/`, with the diffusers class its config.json names, in
eval mode. After swapping it into a pipeline, the family's `prepare_sampling(pipe)` makes the pipeline
run as xdpo's loader does (SD3 without T5: its zero context padding attended once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdpo.errors import DataError


def load_denoiser(folder: str | Path) -> Any:
    """The denoiser `folder` holds, loaded with the diffusers class its config.json names, eval mode."""
    import diffusers

    from xdpo.models.families import denoiser_names

    names = denoiser_names()
    for sub in names:
        config = Path(folder) / sub / "config.json"
        if config.is_file():
            cls = getattr(diffusers, json.loads(config.read_text())["_class_name"])
            return cls.from_pretrained(config.parent).eval()
    raise DataError(f"{folder}: no {' or '.join(f'{n}/' for n in names)} folder with a config.json")
