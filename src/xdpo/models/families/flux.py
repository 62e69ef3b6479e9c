"""Flux.1: FluxTransformer2DModel, CLIP (pooled) + T5 (hidden states), rectified flow, packed latents.

Conditions (as `FluxPipeline.encode_prompt`, which computes them): T5 hidden states as
`encoder_hidden_states`, the pooled CLIP embedding as `pooled_projections`, and for guidance-distilled
checkpoints (FLUX.1-dev, `guidance_embeds`) the guidance scale `family.guidance` per sample.
`predict` packs the [N, C, h, w] latents into 2x2 patches [N, h/2 * w/2, 4C] with their image ids
(FluxPipeline's own helpers), calls the transformer with timestep s (the flow sigma, as the pipeline
passes t / 1000) and zero text ids, and unpacks the prediction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, Option, TextLora, sequence_length

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default

OPTIONS = (
    sequence_length("T5 tokens", DEFAULT_MAX_SEQUENCE_LENGTH),
    Option(
        "guidance",
        float,
        3.5,
        "guidance-distilled checkpoints (FLUX.1-dev): the guidance embedding's scale",
        formerly="model.guidance",
        cached=True,
    ),
)


def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    embeds, pooled, _ = comps.pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        device=device,
        num_images_per_prompt=1,
        max_sequence_length=comps.options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
    )
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if comps.denoiser.config.guidance_embeds:
        cond["guidance"] = torch.full((len(captions),), float(comps.options.guidance), device=device)
    return cond


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    from diffusers import FluxPipeline

    n, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
    text = cond["encoder_hidden_states"]
    txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = cond.get("guidance")
    out = model(
        hidden_states=packed,
        timestep=t / 1000,
        guidance=None if guidance is None else guidance.float(),
        pooled_projections=cond["pooled_projections"],
        encoder_hidden_states=text,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    # unpack: [N, (h/2)(w/2), 4C] -> [N, C, h, w] (the inverse of _pack_latents)
    out = out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(n, c, h, w)


FAMILY = Family(
    name="flux",
    pipeline_class="FluxPipeline",
    class_names=("FluxPipeline",),
    denoiser="transformer",
    process="flow",
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="Flux.1: MMDiT, CLIP pooled + T5, flow matching, packed latents, guidance embedding",
    options=OPTIONS,
    sampling={"steps": 28, "guidance": 3.5, "scheduler": "default"},  # the pipeline's own (FlowMatchEuler)
    latent_patch=2,  # latents packed in 2x2 patches
    packed_latents=True,
    embeddings=("encoder_hidden_states", "pooled_projections"),
    text_lora=(TextLora("text_encoder", kohya="lora_te1_"),),  # CLIP (FluxPipeline's loader reads no T5 LoRA)
)
