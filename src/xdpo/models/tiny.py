"""A tiny, randomly initialised Stable Diffusion pipeline for tests and smoke runs.

It is a genuine SD 1.x architecture (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the real
CLIP tokenizer, SD 1.5's DDPM noise schedule), only narrow: `StableDiffusionPipeline.from_pretrained`
loads it offline and every code path of the trainer runs on it.

Sizes with the defaults: latents 4 x 16 x 16; the VAE has two blocks, so it downsamples x2
(`vae_scale_factor` = 2) and pipeline images are 32 x 32 px (`resolution = sample_size * 2`).
UNet 0.79M, VAE 0.66M, text encoder 1.60M parameters (1.58M of them the 49,408 x 32 token
embeddings that the real CLIP vocabulary requires); ~16 MB on disk in float32, of which the text
encoder is 6.4 MB and transformers 5's tokenizer.json 3.6 MB.

`clip_tokenizer`, `tiny_clip_text_encoder` and `tiny_vae` are shared with the SDXL, SD3 and Flux
pipelines of `xdpo.models.tiny_families`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError

VAE_BLOCKS = (32, 64)
"""VAE channels per block; `vae_scale_factor = 2 ** (len(VAE_BLOCKS) - 1)`."""

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""SD 1.5's noise schedule (its scheduler_config.json); `prediction_type` is set per pipeline."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def tiny_resolution(sample_size: int = 16) -> int:
    """Image side in pixels of a tiny pipeline with latents of side `sample_size`."""
    return sample_size * 2 ** (len(VAE_BLOCKS) - 1)


def build_tiny_pipeline(
    out_dir: str | Path,
    *,
    sample_size: int = 16,
    latent_channels: int = 4,
    prediction_type: str = "epsilon",
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Build a tiny random-weight SD pipeline and `save_pretrained` it into `out_dir`; return the path.

    `sample_size` is the latent side (images are `tiny_resolution(sample_size)` px). `tokenizer_dir`
    reuses an existing CLIP tokenizer folder; by default one is built from the open_clip BPE file.
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    if sample_size < 4 or sample_size % 2:
        raise ConfigError(f"sample_size must be even and >= 4 (the UNet halves it once), got {sample_size}")

    tokenizer = clip_tokenizer(tokenizer_dir)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = tiny_vae(latent_channels=latent_channels, image_size=tiny_resolution(sample_size))
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=32)
    scheduler = DDPMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


# ---- parts shared by the tiny pipelines of every family (see also xdpo.models.tiny_families) ----------


def clip_tokenizer(tokenizer_dir: str | Path | None = None) -> Any:
    """The real CLIP tokenizer: loaded from `tokenizer_dir`, or built from the open_clip BPE file."""
    from transformers import CLIPTokenizer

    from xdpo.models.tokenizer import build_clip_tokenizer

    if tokenizer_dir is not None:
        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="xdpo-tok-") as tmp:
        return build_clip_tokenizer(tmp)


def tiny_clip_text_encoder(
    tokenizer: Any, *, hidden_size: int = 32, projection_dim: int | None = None, heads: int | None = None
) -> Any:
    """A 2-layer CLIP text encoder over the tokenizer's vocabulary: `CLIPTextModel`, or with
    `projection_dim` a `CLIPTextModelWithProjection` (SDXL's and SD3's pooled, projected embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=heads or hidden_size // 8,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_vae(
    *,
    latent_channels: int = 4,
    image_size: int = 32,
    blocks: tuple[int, ...] = VAE_BLOCKS,
    norm_groups: int = 32,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    quant_conv: bool = True,
) -> Any:
    """A small `AutoencoderKL` (downsampling 2 ** (len(blocks) - 1)); SD3 and Flux set `shift_factor`
    and drop the quant convs, as their VAEs do."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=image_size,
        norm_num_groups=norm_groups,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )
