"""Sampling in the digits world: `xdpo.evaluate.pipeline`'s loader and sampler with the digits defaults.

There is one pipeline loader (`xdpo.evaluate.pipeline.load_pipeline`) and one in-memory sampler
(`xdpo.evaluate.pipeline.generate`); these wrappers only fix the digits world's settings: the shipped
base by default (or `digits-flow`, or a folder), on the CPU in float32, at the model's own sampling
defaults (`xdpo.apps.digits.digits_sampling`: 25 DDIM steps and guidance 5 for the UNet base, 25
FlowMatchEuler steps and guidance 3.0 for digits-flow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from xdpo.apps.digits import base_model_path, digits_sampling, pipeline_sampling
from xdpo.evaluate.pipeline import initial_latents
from xdpo.models.families import family_of_pipeline

__all__ = ["denoiser_name", "generate", "initial_latents", "load_pipeline"]


def load_pipeline(path: str | Path | None = None, scheduler: str | None = None) -> Any:
    """A digits pipeline (default: the shipped base; `digits-flow` or any folder) on the CPU in float32,
    with `scheduler` (default: the model's own sampling scheduler)."""
    from xdpo.evaluate.pipeline import load_pipeline as load

    scheduler = scheduler or digits_sampling(path)["scheduler"]
    return load(path if path else base_model_path(), scheduler=scheduler, device="cpu", dtype="fp32")


def denoiser_name(pipe: Any) -> str:
    """The pipeline attribute holding its denoiser: `unet` (SD 1.x) or `transformer` (SD3, Flux)."""
    return family_of_pipeline(pipe).denoiser


def generate(
    pipe: Any,
    prompts: list[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    **kwargs: Any,
) -> list[Image.Image]:
    """`xdpo.evaluate.pipeline.generate` at the pipeline's digits defaults unless given (seed, batch_size,
    latents, progress, desc pass through)."""
    from xdpo.evaluate.pipeline import generate as run

    d = pipeline_sampling(pipe)
    steps = d["steps"] if steps is None else steps
    guidance = d["guidance"] if guidance is None else guidance
    return run(pipe, prompts, steps=steps, guidance=guidance, **kwargs)
