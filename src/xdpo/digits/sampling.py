"""Sampling in the digits world: `xdpo.evaluate.sample`'s loader and sampler with the digits defaults.

There is one pipeline loader (`xdpo.evaluate.sample.load_pipeline`) and one in-memory sampler
(`xdpo.evaluate.sample.generate`); these wrappers only fix the digits world's settings: the shipped
base by default, on the CPU in float32, 25 DDIM steps and guidance 5 (`DIGITS_SAMPLING`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from xdpo.digits import DIGITS_SAMPLING, base_model_path
from xdpo.evaluate.sample import initial_latents

__all__ = ["generate", "initial_latents", "load_pipeline"]


def load_pipeline(path: str | Path | None = None, scheduler: str = DIGITS_SAMPLING["scheduler"]) -> Any:
    """A digits pipeline (default: the shipped base) on the CPU in float32, with `scheduler`."""
    from xdpo.evaluate.sample import load_pipeline as load

    return load(path if path else base_model_path(), scheduler=scheduler, device="cpu", dtype="fp32")


def generate(
    pipe: Any,
    prompts: list[str],
    *,
    steps: int = DIGITS_SAMPLING["steps"],
    guidance: float = DIGITS_SAMPLING["guidance"],
    **kwargs: Any,
) -> list[Image.Image]:
    """`xdpo.evaluate.sample.generate` at the digits defaults (seed, batch_size, latents, progress, desc)."""
    from xdpo.evaluate.sample import generate as run

    return run(pipe, prompts, steps=steps, guidance=guidance, **kwargs)
