"""Wan 2.1 / 2.2 text-to-video: WanTransformer3DModel, UMT5 text encoder, flow matching on video latents.

Conditions (`WanPipeline.encode_prompt`, which computes them): UMT5's last hidden state of the cleaned
prompt, cut to its real tokens and zero-padded to `max_sequence_length` (the pipeline's call: 512), as
`encoder_hidden_states`.
Latents: clips [N, 3, F, H, W] through the causal 3-D VAE (4k + 1 frames -> k + 1 latent frames), then
(z - latents_mean) / latents_std per channel (the inverse of the pipeline's decode): [N, 16, F', h, w].
`predict` calls the transformer with the timestep 1000 sigma (the pipeline's UniPC timesteps are that,
rounded down to integers). Sigmas: the scheduler's own (`use_flow_sigmas`, `flow_shift` 3.0 for 480p Wan
2.1 and 5.0 for 720p: `xdpo.models.noise.FlowProcess`). Preference data are clips (`data.num_frames`
frames at `data.fps`), the Flow-DPO loss runs on per-video errors, samples are videos.
Wan 2.2's two-expert A14B checkpoints (`transformer_2`, `boundary_ratio`) are refused: each expert serves
half of the noise levels and xdpo trains one denoiser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError
from xdpo.models.families.qwenimage import channel_stats
from xdpo.models.families.spec import Family, sequence_length

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default (encode_prompt's own is 226)

OPTIONS = (sequence_length("UMT5 tokens", DEFAULT_MAX_SEQUENCE_LENGTH),)


@torch.no_grad()
def encode_text(comps: Any, captions: list[str], device: torch.device) -> dict[str, Tensor]:
    length = comps.options.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    embeds, _ = comps.pipe.encode_prompt(
        prompt=list(captions), do_classifier_free_guidance=False, max_sequence_length=length, device=device
    )
    return {"encoder_hidden_states": embeds}


def image_conditions(
    comps: Any, n: int, pixel_size: tuple[int, int], sizes: dict | None = None
) -> dict[str, Tensor]:
    return {}


def predict(model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return model(
        hidden_states=noisy,
        timestep=t,
        encoder_hidden_states=cond["encoder_hidden_states"],
        return_dict=False,
    )[0]


def to_latents(vae: Any, z: Tensor) -> Tensor:
    """(z - latents_mean) / latents_std per channel: [N, C, F', h, w]."""
    mean, std = channel_stats(vae, z)
    return (z - mean) / std


def check_index(info: dict[str, Any]) -> None:
    if (info.get("transformer_2") or [None])[0] is not None or info.get("boundary_ratio"):
        raise ConfigError(
            "model.pretrained: a two-expert Wan 2.2 checkpoint (transformer_2, boundary_ratio) splits the "
            "noise levels between two denoisers; xdpo trains one (Wan 2.1 T2V 1.3B/14B, Wan 2.2 TI2V-5B)"
        )


FAMILY = Family(
    name="wan",
    pipeline_class="WanPipeline",
    class_names=("WanPipeline",),
    denoiser="transformer",
    process="flow",
    encode_text=encode_text,
    image_conditions=image_conditions,
    predict=predict,
    about="Wan 2.x: text-to-video 3-D DiT, UMT5, flow matching on video latents",
    options=OPTIONS,
    # WanPipeline's call: 50 steps, guidance 5; 81 frames of 480 x 832 written at Wan 2.1's 16 fps
    sampling={"steps": 50, "guidance": 5.0, "scheduler": "default", "num_frames": 81, "fps": 16},
    latent_patch=2,  # the transformer's 1 x 2 x 2 patches
    packed_latents=True,
    embeddings=("encoder_hidden_states",),
    to_latents=to_latents,
    check_index=check_index,
    video=True,
)
