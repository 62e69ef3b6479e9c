"""Sampling from a digits pipeline: batched, seeded per image, with a progress bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from xdpo.digits import DIGITS_SAMPLING, base_model_path
from xdpo.errors import XdpoError


def load_pipeline(path: str | Path | None = None, scheduler: str = DIGITS_SAMPLING["scheduler"]):
    """Load a digits `StableDiffusionPipeline` (default: the shipped base) with a DDIM or DDPM scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    path = Path(path) if path else base_model_path()
    if not (path / "model_index.json").is_file():
        raise XdpoError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()  # "Loading pipeline components" bars: noise for a 10 MB model
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path)
    finally:
        if was_enabled:
            dlog.enable_progress_bar()
    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if scheduler not in classes:
        raise XdpoError(f"unknown scheduler {scheduler!r}; choose one of {sorted(classes)}")
    pipe.scheduler = classes[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(pipe, n: int, seed: int):
    """Starting noise for n images from one seeded generator (so image i is independent of batching)."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    c = pipe.unet.config
    return torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=g)


def generate(
    pipe,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = DIGITS_SAMPLING["steps"],
    guidance: float = DIGITS_SAMPLING["guidance"],
    batch_size: int = 128,
    latents=None,
    progress: bool = True,
    desc: str = "sampling",
) -> list[Image.Image]:
    """Images for `prompts` (RGB PIL, 32x32) at the given DDIM steps and guidance, seeded per image."""
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    latents = initial_latents(pipe, len(prompts), seed) if latents is None else latents
    images: list[Image.Image] = []
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            out = pipe(
                prompt=prompts[i : i + batch_size],
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=latents[i : i + batch_size],
                output_type="np",
            ).images
            images += [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in out]
            bar.update(len(out))
    return images
