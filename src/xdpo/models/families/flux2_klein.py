"""FLUX.2 [klein] (4B, 9B; base and step-distilled): Flux2Transformer2DModel without a guidance embedding,
Qwen3 text encoder, rectified flow, packed latents.

What differs from FLUX.2 [dev] (`flux2.py`, whose latents, packing, ids and mu this family shares): the
pipeline class (`Flux2KleinPipeline`); the conditions (`encode_prompt`: Qwen3's hidden states of layers
9, 18 and 27 over its chat template without thinking, stacked along the features); no guidance input
(the pipeline passes `guidance=None`; classifier-free guidance at sampling, `guidance_scale`, unless the
checkpoint is step-distilled: `is_distilled` in model_index.json). Sampling defaults are the pipeline's
(50 steps, guidance 4.0); a distilled checkpoint samples in 4 steps at guidance 1 (its model card): pass
`--steps 4 --guidance 1` and train with `family.shift_steps=4`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from xdpo.models.families import flux2


@torch.no_grad()
def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    return {"encoder_hidden_states": flux2.prompt_embeds(comps, captions, device)}


FAMILY = dataclasses.replace(
    flux2.FAMILY,
    name="flux2_klein",
    pipeline_class="Flux2KleinPipeline",
    class_names=("Flux2KleinPipeline",),
    encode_text=encode_text,
    about="FLUX.2 [klein]: 4B/9B MMDiT, Qwen3 layers 9/18/27, flow matching, classifier-free guidance",
    options=(flux2.MAX_SEQUENCE_LENGTH, flux2.SHIFT_STEPS),
    sampling={"steps": flux2.DEFAULT_STEPS, "guidance": 4.0, "scheduler": "default"},  # Flux2KleinPipeline's
)
