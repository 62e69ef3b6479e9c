"""FLUX.2 [dev]: Flux2Transformer2DModel (32B), Mistral-Small-3.1 text encoder, rectified flow, packed latents.

Conditions (`Flux2Pipeline.encode_prompt`, which computes them): the text encoder's hidden states of layers
10, 20 and 30 stacked along the features over the chat-formatted prompt padded to `max_sequence_length`
(512), as `encoder_hidden_states`; the guidance-distilled transformer's guidance `family.embedded_guidance`
per sample (the pipeline's `guidance_scale`, 4.0 by default). Text and image position ids (4 axes: t, h, w,
l) are the pipeline's own `_prepare_text_ids` / `_prepare_latent_ids`, made in `predict`.
Latents: the VAE's latents patchified 2x2 (`_patchify_latents`: [N, 4 z, h / 2, w / 2]) and normalised by
the VAE's batch-norm running statistics, exactly as `_encode_vae_image` (the pipeline's decode inverts
it): the space the pipeline draws its noise in. `predict` flattens them to tokens (`_pack_latents`), calls
the transformer with timestep sigma (the pipeline passes t / 1000) and folds the prediction back.
Sigmas: FLUX.2's pipeline computes mu itself from the image tokens and the number of sampling steps
(`compute_empirical_mu`, not the scheduler config's shifts); training shifts by the mu the pipeline uses
at `family.shift_steps` steps (0 = its default 50).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, Option, sequence_length

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # Flux2Pipeline's default
DEFAULT_STEPS = 50  # Flux2Pipeline.__call__'s num_inference_steps

MAX_SEQUENCE_LENGTH = sequence_length("prompt tokens", DEFAULT_MAX_SEQUENCE_LENGTH)
SHIFT_STEPS = Option(
    "shift_steps",
    int,
    0,
    "the sampling steps whose mu (compute_empirical_mu) shifts the training sigmas (0 = the pipeline's "
    f"default, {DEFAULT_STEPS})",
    check=lambda v: v >= 0,
    rule="must be >= 0",
)
OPTIONS = (
    MAX_SEQUENCE_LENGTH,
    Option(
        "embedded_guidance",
        float,
        4.0,
        "guidance-distilled FLUX.2 [dev]: the guidance embedding's scale (Flux2Pipeline's guidance_scale, 4.0)",
        cached=True,
    ),
    SHIFT_STEPS,
)


def prompt_embeds(comps: Any, captions: list[str], device: torch.device) -> Tensor:
    """The pipeline's `encode_prompt` embeddings [B, L, 3 D] (its default text-encoder layers)."""
    length = comps.options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    embeds, _ = comps.pipe.encode_prompt(prompt=list(captions), device=device, max_sequence_length=length)
    return embeds


@torch.no_grad()
def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    cond = {"encoder_hidden_states": prompt_embeds(comps, captions, device)}
    if comps.denoiser.config.guidance_embeds:
        cond["guidance"] = torch.full((len(captions),), float(comps.options.embedded_guidance), device=device)
    return cond


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    from diffusers import Flux2Pipeline

    n, c, h, w = noisy.shape
    text = cond["encoder_hidden_states"]
    guidance = cond.get("guidance")
    out = model(
        hidden_states=Flux2Pipeline._pack_latents(noisy),
        timestep=t / 1000,
        guidance=None if guidance is None else guidance.float(),
        encoder_hidden_states=text,
        txt_ids=Flux2Pipeline._prepare_text_ids(text).to(noisy.device),
        img_ids=Flux2Pipeline._prepare_latent_ids(noisy).to(noisy.device),
        return_dict=False,
    )[0]
    # unpack: [N, h w, C] -> [N, C, h, w] (the row-major ids' scatter of `_unpack_latents_with_ids`)
    return out[:, : h * w].permute(0, 2, 1).reshape(n, c, h, w)


def sampled_latents(pipe: Any, latents: Tensor, height: int, width: int) -> Tensor:
    """The pipeline's tokens [N, h w, 4 z] (normalised patches, row-major) -> [N, 4 z, h, w], h = H / (2 s)."""
    n, _, c = latents.shape
    h, w = height // (2 * pipe.vae_scale_factor), width // (2 * pipe.vae_scale_factor)
    return latents[:, : h * w].permute(0, 2, 1).reshape(n, c, h, w)


def batch_norm_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's batch-norm running mean and sqrt(var + eps), [1, 4 z, 1, 1], as the pipeline reads them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


def to_latents(vae: Any, z: Tensor) -> Tensor:
    """2x2-patchified, batch-norm-normalised latents [N, 4 z, h / 2, w / 2] (Flux2Pipeline._encode_vae_image)."""
    from diffusers import Flux2Pipeline

    patches = Flux2Pipeline._patchify_latents(z)
    mean, std = batch_norm_stats(vae, patches)
    return (patches - mean) / std


def shift_mu(image_seq_len: int, scheduler_config: Any, options: Any) -> float:
    """mu of the pipeline's `compute_empirical_mu` at `family.shift_steps` sampling steps (default 50)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len, int(options.shift_steps or DEFAULT_STEPS))


FAMILY = Family(
    name="flux2",
    pipeline_class="Flux2Pipeline",
    class_names=("Flux2Pipeline",),
    denoiser="transformer",
    process="flow",
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="FLUX.2 [dev]: 32B MMDiT, Mistral-Small-3.1 layers 10/20/30, flow matching, guidance embedding",
    options=OPTIONS,
    sampling={"steps": DEFAULT_STEPS, "guidance": 4.0, "scheduler": "default"},  # Flux2Pipeline's own
    latent_patch=2,  # the VAE's latents patchified 2x2 (one token per patch)
    packed_latents=True,
    sampled_latents=sampled_latents,
    embeddings=("encoder_hidden_states",),
    to_latents=to_latents,
    shift_mu=shift_mu,
)
