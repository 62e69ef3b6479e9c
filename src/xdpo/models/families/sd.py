"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel on one CLIP text encoder's last hidden state, DDPM."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, TextLora, diffusers_lora_state


def load_kwargs(options: Any) -> dict[str, Any]:
    """No safety checker: it is not needed for training and its weights are 1.2 GB."""
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    """CLIP last hidden states [B, 77, D], as SD 1.x/2.x condition on them."""
    tok, enc = comps.tokenizers["tokenizer"], comps.text_encoders["text_encoder"]
    ids = tok(
        captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return {"encoder_hidden_states": enc(ids)[0]}


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return model(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


FAMILY = Family(
    name="sd",
    pipeline_class="StableDiffusionPipeline",
    class_names=("StableDiffusionPipeline",),
    denoiser="unet",
    process="ddpm",
    load_kwargs=load_kwargs,
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="SD 1.x/2.x: UNet, one CLIP encoder, DDPM (eps or v)",
    lora_state_for_saving=diffusers_lora_state,
    embeddings=("encoder_hidden_states",),
    text_lora=(TextLora("text_encoder", kohya="lora_te_"),),
)
