"""Qwen-Image: QwenImageTransformer2DModel (MMDiT, 20B), Qwen2.5-VL text encoder, rectified flow, packed latents.

Conditions (`QwenImagePipeline.encode_prompt`, which computes them): the last hidden state of Qwen2.5-VL over
the pipeline's prompt template, its first 34 tokens dropped, as `encoder_hidden_states`, with its
attention mask. The pipeline pads a batch to its longest prompt; here every caption is padded to
`family.max_sequence_length` (the pipeline's 512) with its mask, so that captions encoded apart (the
cache) stack, and `predict` cuts the batch back to its longest prompt (the mask dropped when it is all
ones, as `encode_prompt` drops it): the denoiser sees what the pipeline feeds it.
Latents: the 3-D VAE encodes an image as a 1-frame video; (z - latents_mean) / latents_std per channel
(the inverse of the pipeline's decode), the frame axis dropped: [N, 16, h, w]. `predict` packs 2x2 patches
as `_pack_latents`, with `img_shapes` [(1, h / 2, w / 2)], timestep sigma (the pipeline passes t / 1000),
and unpacks the prediction. Sigmas: the scheduler's dynamic shift (mu linear in the image tokens, up to
8192), stretched to `shift_terminal` 0.02 (`xdpo.models.noise.FlowProcess`). Sampling: CFG is
`true_cfg_scale` with a negative prompt (" ", as Qwen-Image's model card shows), not `guidance_scale`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.models.families.spec import Family, sequence_length

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default

OPTIONS = (sequence_length("prompt tokens after the template", DEFAULT_MAX_SEQUENCE_LENGTH),)


def pad_to(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 1 of [B, n, ...] to `length`."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


@torch.no_grad()
def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    length = comps.options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    embeds, mask = comps.pipe.encode_prompt(prompt=list(captions), device=device, max_sequence_length=length)
    if mask is None:  # every prompt as long as the longest: encode_prompt drops an all-ones mask
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {
        "encoder_hidden_states": pad_to(embeds, length),
        "encoder_hidden_states_mask": pad_to(mask, length),
    }


def trimmed_text(cond: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The conditions cut to the batch's longest prompt, the mask None when it is all ones (the pipeline's
    own batch encoding)."""
    mask = cond["encoder_hidden_states_mask"]
    n = int(mask.sum(dim=1).max())
    text, mask = cond["encoder_hidden_states"][:, :n], mask[:, :n]
    return text, None if bool(mask.all()) else mask


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def pack(x: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, (h/2)(w/2), 4C] (QwenImagePipeline._pack_latents)."""
    from diffusers import QwenImagePipeline

    n, c, h, w = x.shape
    return QwenImagePipeline._pack_latents(x, n, c, h, w)


def unpack(x: Tensor, c: int, h: int, w: int) -> Tensor:
    """The inverse of `pack` (QwenImagePipeline._unpack_latents without its frame axis)."""
    n = x.shape[0]
    return x.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def sampled_latents(pipe: Any, latents: Tensor, height: int, width: int) -> Tensor:
    """The pipeline's packed latents [N, tokens, 4C] -> [N, C, h, w] (its `_unpack_latents`, frame axis dropped)."""
    return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor).squeeze(2)


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    n, c, h, w = noisy.shape
    text, mask = trimmed_text(cond)
    out = model(
        hidden_states=pack(noisy),
        timestep=t / 1000,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=text,
        img_shapes=[[(1, h // 2, w // 2)]] * n,
        return_dict=False,
    )[0]
    return unpack(out, c, h, w)


def posterior(vae: Any, pixels: Tensor) -> Any:
    """The 3-D VAE's posterior of images as 1-frame videos: [N, 3, H, W] -> latents [N, C, 1, h, w]."""
    return vae.encode(pixels.unsqueeze(2).to(dtype=vae.dtype)).latent_dist


def channel_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE config's per-channel latents_mean and latents_std, shaped [1, C, 1, ...] like `like`."""
    shape = (1, -1, *([1] * (like.ndim - 2)))
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def to_latents(vae: Any, z: Tensor) -> Tensor:
    """(z - latents_mean) / latents_std per channel, the frame axis dropped: [N, C, h, w]."""
    mean, std = channel_stats(vae, z)
    return ((z - mean) / std).squeeze(-3)


def true_cfg(guidance: float) -> dict[str, Any]:
    """Qwen-Image's classifier-free guidance: `true_cfg_scale` with a negative prompt (" " enables it)."""
    return {"true_cfg_scale": guidance, "negative_prompt": " "} if guidance > 1 else {"true_cfg_scale": 1.0}


FAMILY = Family(
    name="qwenimage",
    pipeline_class="QwenImagePipeline",
    class_names=("QwenImagePipeline",),
    denoiser="transformer",
    process="flow",
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="Qwen-Image: 20B MMDiT, Qwen2.5-VL text states with a mask, flow matching, packed latents",
    options=OPTIONS,
    sampling={"steps": 50, "guidance": 4.0, "scheduler": "default"},  # QwenImagePipeline's (true_cfg_scale 4)
    latent_patch=2,  # latents packed in 2x2 patches
    packed_latents=True,
    sampled_latents=sampled_latents,
    embeddings=("encoder_hidden_states",),
    posterior=posterior,
    to_latents=to_latents,
    guidance_kwargs=true_cfg,
)
