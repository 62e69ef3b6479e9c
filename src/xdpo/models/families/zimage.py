"""Z-Image (and Z-Image-Turbo): ZImageTransformer2DModel (6B single-stream DiT), Qwen3 text encoder, flow.

Conditions (`ZImagePipeline.encode_prompt`, which computes them): Qwen3's second-to-last hidden state over
the chat-formatted prompt (with thinking), one tensor per prompt holding only its real tokens. Here each is
padded to `family.max_sequence_length` (the pipeline's 512) with a boolean mask, so that captions stack;
`predict` hands the transformer the unpadded list again.
Latents: FLUX.1's VAE, (z - shift) * scaling, [N, 16, h, w]. The transformer takes a list of [C, 1, h, w]
latents and the timestep 1 - sigma (the pipeline passes (1000 - t) / 1000) and predicts x0 - eps: the
pipeline negates it before the Euler step, so `predict` returns its negation, the velocity eps - x0 that
xdpo's flow process regresses. Sigmas: the scheduler's static shift (3.0 for Z-Image-Turbo). Sampling
defaults are Z-Image-Turbo's (8 steps, guidance 0: the diffusers example); Z-Image's base checkpoint
samples with classifier-free guidance (`guidance_scale` > 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, sequence_length

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default

OPTIONS = (sequence_length("prompt tokens after the chat template", DEFAULT_MAX_SEQUENCE_LENGTH),)


@torch.no_grad()
def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    length = comps.options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    # a copy: the pipeline writes the chat-formatted prompts into the list it is given
    embeds, _ = comps.pipe.encode_prompt(
        prompt=list(captions), device=device, do_classifier_free_guidance=False, max_sequence_length=length
    )
    dim = embeds[0].shape[-1]
    out = embeds[0].new_zeros((len(embeds), length, dim))
    mask = torch.zeros((len(embeds), length), dtype=torch.bool, device=out.device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return {"encoder_hidden_states": out, "encoder_attention_mask": mask}


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    mask = cond["encoder_attention_mask"]
    caps = [e[m] for e, m in zip(cond["encoder_hidden_states"], mask, strict=True)]
    out = model(list(noisy.unsqueeze(2).unbind(0)), (1000 - t) / 1000, caps, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def sampled_latents(pipe: Any, latents: Tensor, height: int, width: int) -> Tensor:
    """The pipeline's latents are already [N, C, h, w] in the denoiser's space (its decode scales them back)."""
    return latents


FAMILY = Family(
    name="zimage",
    pipeline_class="ZImagePipeline",
    class_names=("ZImagePipeline",),
    denoiser="transformer",
    process="flow",
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="Z-Image: 6B single-stream DiT, Qwen3 hidden states, flow matching (x0 - eps predicted)",
    options=OPTIONS,
    sampling={
        "steps": 8,
        "guidance": 0.0,
        "scheduler": "default",
    },  # Z-Image-Turbo (ZImagePipeline's example)
    latent_patch=2,  # the transformer's 2x2 patches
    packed_latents=True,
    sampled_latents=sampled_latents,
    embeddings=("encoder_hidden_states",),
)
