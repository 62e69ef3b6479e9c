"""One encode path: any `Batch` -> latents and conditions (`Encoded`), for the training step, the probe
set of the reference's divergence check, and the cache writer (`xdpo cache` stores `posterior_params`
and `text_conditions`, what `encode` would compute from the same rows).

- Images: latents as they are (a rollout's clean samples), pixels (or clips [N, 3, F, H, W] of a video
  family) through the VAE as the family's pipeline encodes them (`family.posterior`; a sample of the
  posterior, as Diffusion-DPO, or its mean), or cached
  posterior parameters: z = mean + exp(logvar / 2) eps with eps drawn from the step's generator in the
  cache's dtype, the draw diffusers' posterior `sample` makes, so a cached fp32 run equals an uncached
  one and resume stays exact. Latents are normalised into the denoiser's space (`family.to_latents`:
  scaling and shift, per-channel statistics, FLUX.2's patchified batch norm) and float32.
- Text: the family's conditions of each caption (`family.encode_text`), or the cached ones; pairs share
  their caption's conditions (repeated for [w; l]). When text encoders train LoRA (`model.lora_text_encoder`,
  `comps.text_lora`) the conditions are computed with autograd through them, and the reference's apart with
  their adapters off (`Encoded.ref_cond`, the base encoders'); cached conditions are refused then.
- Per-image conditions (SDXL's size ids) from the batch's recorded sizes (`family.image_conditions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdpo.data.batch import Batch


@dataclass
class Encoded:
    """What the denoiser trains on: latents [N, C, h, w] ([N, C, F, h, w] for clips; float32, in the
    denoiser's space) and conditions [N, ...]."""

    latents: Tensor
    cond: dict[str, Tensor]
    pairs: bool  # [w; l] halves (N = 2B) or independent images
    ref_cond: dict[str, Tensor] | None = None  # the base text encoders' (their LoRA off); None = `cond`

    @property
    def reference_cond(self) -> dict[str, Tensor]:
        """The conditions of the reference and the initial model: the base text encoders'."""
        return self.cond if self.ref_cond is None else self.ref_cond

    def first(self, k: int) -> Encoded:
        """The first k images (for pairs: winners first) as independent images (the probe set)."""
        ref = None if self.ref_cond is None else {key: v[:k] for key, v in self.ref_cond.items()}
        return Encoded(self.latents[:k], {key: v[:k] for key, v in self.cond.items()}, False, ref)


@torch.no_grad()
def posterior_params(comps: Any, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE posterior's (mean, logvar) of pixels in [-1, 1], unscaled, float32 (what the cache stores)."""
    dist = comps.family.posterior(comps.vae, pixels)
    return dist.mean.float(), dist.logvar.float()


@torch.no_grad()
def text_conditions(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    """The family's conditions of `captions` ([B, ...] per key), as its pipeline's `encode_prompt` gives."""
    return comps.family.encode_text(comps, captions, device)


@torch.no_grad()
def encode(comps: Any, batch: Batch, gen: torch.Generator, sample: bool = True) -> Encoded:
    """Latents and conditions of `batch` on `gen`'s device. `sample`: a posterior sample, else its mean."""
    device, fam = gen.device, comps.family
    if batch.latents is not None:  # already in the denoiser's space (a rollout's samples)
        latents = batch.latents.to(device).float()
    elif batch.posterior is not None:
        z = batch.posterior[0].to(device)
        if sample:
            eps = torch.randn(z.shape, generator=gen, device=device, dtype=z.dtype)
            z = z + torch.exp(0.5 * batch.posterior[1].to(device)) * eps
        latents = fam.to_latents(comps.vae, z).float()
    else:
        pixels = batch.pixels.to(device)
        if sample:
            latents = fam.to_latents(
                comps.vae, fam.posterior(comps.vae, pixels).sample(generator=gen)
            ).float()
        else:
            latents = fam.to_latents(comps.vae, posterior_params(comps, pixels)[0]).float()
    extra = comps.family.image_conditions(comps, latents.shape[0], batch.pixel_size, batch.sizes)

    def conditions(text: dict[str, Tensor]) -> dict[str, Tensor]:
        cond = {k: (torch.cat([v, v]) if batch.pairs else v).to(device) for k, v in text.items()}
        return cond | {k: v.to(device) for k, v in extra.items()}

    if getattr(comps, "text_lora", None):
        policy, base = trained_text_conditions(comps, batch, device)
        with torch.enable_grad():  # the pairs' repeat keeps the graph to the encoders' LoRA
            cond = conditions(policy)
        return Encoded(latents, cond, batch.pairs, conditions(base))
    text = batch.cond if batch.cond is not None else text_conditions(comps, batch.captions, device)
    return Encoded(latents, conditions(text), batch.pairs)


def trained_text_conditions(
    comps: Any, batch: Batch, device: torch.device
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the policy's conditions, with autograd through the text encoders' LoRA; the base encoders', their
    adapters off, without autograd) of the batch's captions."""
    from xdpo.errors import XdpoError
    from xdpo.models.lora import text_adapters_disabled

    if batch.cond is not None:
        raise XdpoError(
            "model.lora_text_encoder: this batch carries precomputed text conditions (data.cache), but the "
            "text encoders train; their encodings must be computed each step"
        )
    with torch.enable_grad():
        policy = comps.family.encode_text(comps, batch.captions, device)
    with torch.no_grad(), text_adapters_disabled(comps.text_lora):
        base = comps.family.encode_text(comps, batch.captions, device)
    return policy, base
