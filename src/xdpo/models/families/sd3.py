"""SD3 / SD3.5: SD3Transformer2DModel (MMDiT), CLIP-L + CLIP-G + T5 (optional), rectified flow.

Conditions (as `StableDiffusion3Pipeline.encode_prompt`, which computes them): the CLIP-L and CLIP-G
penultimate hidden states concatenated, zero-padded to T5's width and followed along the sequence by
the T5 hidden states (zeros without T5) as `encoder_hidden_states`; both pooled CLIP embeddings
concatenated as `pooled_projections`. `family.text_encoder_3: false` drops T5 (diffusers allows it).
The transformer sees the timestep s * 1000 (s the flow sigma). Without T5 the context ends in
`max_sequence_length` zero tokens: `predict` attends to them once (`xdpo.models.padding`, the same
function; ~3x faster steps on the digits-flow base).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, Option, TextLora, sequence_length

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default

OPTIONS = (
    Option(
        "text_encoder_3",
        bool,
        True,
        "load the T5 text encoder (false drops it, as diffusers allows)",
        formerly="model.text_encoder_3",
        cached=True,
    ),
    sequence_length("T5 tokens", DEFAULT_MAX_SEQUENCE_LENGTH),
)


def load_kwargs(options: Any) -> dict[str, Any]:
    return {} if options.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}


def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    embeds, _, pooled, _ = comps.pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=comps.options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    from diffusers import SD3Transformer2DModel

    from xdpo.models.padding import HOOKED, collapse_zero_padding

    if isinstance(model, SD3Transformer2DModel) and not getattr(model, HOOKED, False):
        collapse_zero_padding(model)  # an unwrapped transformer only (not DDP / FSDP wrappers)
    return model(
        hidden_states=noisy,
        timestep=t,
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        return_dict=False,
    )[0]


def prepare_sampling(pipe: Any) -> None:
    """Without T5 the context ends in zero tokens: attend to them once (the same images, ~6x faster on
    digits-flow; `xdpo.models.padding`)."""
    if getattr(pipe, "text_encoder_3", 0) is None:
        from xdpo.models.padding import collapse_zero_padding

        collapse_zero_padding(pipe.transformer)


FAMILY = Family(
    name="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    class_names=("StableDiffusion3Pipeline",),
    denoiser="transformer",
    process="flow",
    load_kwargs=load_kwargs,
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="SD3/SD3.5: MMDiT, CLIP-L + CLIP-G + T5, flow matching",
    options=OPTIONS,
    sampling={"steps": 28, "guidance": 7.0, "scheduler": "default"},  # the pipeline's own (FlowMatchEuler)
    latent_patch=2,  # the transformer's patch embedding (patch_size 2)
    prepare_sampling=prepare_sampling,
    embeddings=("encoder_hidden_states", "pooled_projections"),
    text_lora=(TextLora("text_encoder"), TextLora("text_encoder_2")),  # CLIP-L, CLIP-G; not T5
)
