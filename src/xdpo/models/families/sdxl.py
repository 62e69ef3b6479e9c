"""SDXL: UNet2DConditionModel with `added_cond_kwargs`, two CLIP text encoders, DDPM.

Conditions (as `StableDiffusionXLPipeline.encode_prompt`, which computes them): the penultimate hidden
states of CLIP-L and CLIP-G concatenated [B, 77, 2048]; the pooled, projected CLIP-G embedding
`text_embeds` [B, 1280]; and per image `time_ids` = (original h, original w, crop top, crop left,
target h, target w) (Podell et al. 2023 §2.2), from each image's size and crop offsets before resizing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, TextLora, diffusers_lora_state


def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    embeds, _, pooled, _ = comps.pipe.encode_prompt(
        prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def time_ids(original_hw: Tensor, crop_tl: Tensor, target_hw: tuple[int, int]) -> Tensor:
    """[N, 6] = (orig h, orig w, crop top, crop left, target h, target w), float32."""
    target = torch.tensor(target_hw, dtype=torch.float32).expand(original_hw.shape[0], 2)
    return torch.cat([original_hw.float(), crop_tl.float(), target], dim=1)


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """time_ids of n images of `pixel_size` (h, w); `sizes` holds their `original_size` and `crop_top_left`
    [n, 2] when recorded; without them (e.g. square images) the target size and crop (0, 0)."""
    h, w = pixel_size
    orig = (sizes or {}).get("original_size")
    crop = (sizes or {}).get("crop_top_left")
    if orig is None:
        orig = torch.tensor([[h, w]] * n)
    if crop is None:
        crop = torch.zeros(n, 2)
    return {"time_ids": time_ids(orig, crop, (h, w))}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return model(
        noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
    ).sample


FAMILY = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    class_names=("StableDiffusionXLPipeline",),
    denoiser="unet",
    process="ddpm",
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="SDXL: UNet with added time ids, CLIP-L + CLIP-G, DDPM",
    lora_state_for_saving=diffusers_lora_state,
    sampling={"steps": 50, "guidance": 7.5, "scheduler": "default"},  # the pipeline's own (Euler)
    embeddings=("encoder_hidden_states", "text_embeds"),
    text_lora=(TextLora("text_encoder", kohya="lora_te1_"), TextLora("text_encoder_2", kohya="lora_te2_")),
)
