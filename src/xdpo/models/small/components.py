"""Small components in the real diffusers / transformers classes, each one function with size parameters.

The tiny test pipelines (`xdpo.models.small.pipelines`) and the digits bases (`xdpo.apps.digits`) are
built from these; a component's random weights are drawn from torch's global generator as the class
constructs them, so the caller seeds (`torch.manual_seed`) and fixes the order of construction.

- `clip_text_encoder`: a CLIP text encoder over the real 49,408-token CLIP vocabulary (ids of
  `xdpo.models.tokenizer`'s CLIP tokenizer: <|startoftext|> 49406, <|endoftext|> 49407 = pad, 77 positions).
- `t5_encoder`: a 2-layer T5 v1.1 encoder (gated-gelu) over a tokenizer's vocabulary.
- `vae`: an `AutoencoderKL` of `len(blocks)` blocks (downsampling 2 ** (len(blocks) - 1)).
- `unet`: a `UNet2DConditionModel` with cross-attention at the levels chosen.
- `sd3_transformer` / `flux_transformer`: `SD3Transformer2DModel` (MMDiT) / `FluxTransformer2DModel`.
- `ddpm_scheduler`, `euler_scheduler`, `flow_scheduler`: the real models' training schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xdpo.errors import ConfigError

CLIP_VOCAB, CLIP_POSITIONS, CLIP_BOS, CLIP_EOS = 49408, 77, 49406, 49407
"""The CLIP tokenizer's vocabulary size, max length and special ids (its pad is <|endoftext|> = EOS)."""

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

SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}
"""stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (EulerDiscreteScheduler)."""

FLUX_DYNAMIC_SHIFT = {
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""black-forest-labs/FLUX.1-dev's scheduler_config.json besides `num_train_timesteps` and `shift` (3.0)."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def clip_text_encoder(
    *,
    hidden_size: int,
    intermediate_size: int,
    heads: int | None = None,
    layers: int = 2,
    projection_dim: int | None = None,
    with_projection: bool = False,
) -> Any:
    """A CLIP text encoder (quick-gelu): `CLIPTextModel`, or `CLIPTextModelWithProjection` (SDXL's and
    SD3's pooled, projected embedding) with `with_projection`. `heads` defaults to hidden_size // 8;
    `projection_dim` None keeps transformers' default in the config (512)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads or hidden_size // 8,
        max_position_embeddings=CLIP_POSITIONS,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=CLIP_EOS,
        hidden_act="quick_gelu",
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def t5_encoder(tokenizer: Any, *, d_model: int = 48) -> Any:
    """A 2-layer `T5EncoderModel` (T5 v1.1 gated-gelu feed-forward, 4 heads of 8) over `tokenizer`'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
    )
    return T5EncoderModel(config)


def vae(
    *,
    blocks: Sequence[int],
    latent_channels: int = 4,
    image_size: int = 32,
    norm_groups: int = 32,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    quant_conv: bool = True,
) -> Any:
    """An `AutoencoderKL` (RGB, one layer per block, downsampling 2 ** (len(blocks) - 1)); SD3 and Flux set
    `shift_factor` and drop the quant convs, as their VAEs do."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=tuple(blocks),
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=image_size,
        norm_num_groups=norm_groups,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def unet(
    *,
    sample_size: int,
    blocks: Sequence[int],
    cross_attention: Sequence[bool],
    cross_attention_dim: int,
    heads: int | Sequence[int],
    latent_channels: int = 4,
    norm_groups: int = 32,
    **conditioning: Any,
) -> Any:
    """A `UNet2DConditionModel`, one layer per block: level i has `blocks[i]` channels and cross-attention
    when `cross_attention[i]` (up blocks mirror the down blocks). `heads` is diffusers' `attention_head_dim`
    (read as the number of heads). `conditioning`: further `UNet2DConditionModel` keys as given (SDXL's
    `addition_embed_type="text_time"`, the digits base's pooled-text `addition_embed_type="text"`, ...)."""
    from diffusers import UNet2DConditionModel

    if len(cross_attention) != len(blocks):
        raise ConfigError(f"unet: cross_attention has {len(cross_attention)} levels, blocks {len(blocks)}")
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross_attention)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(blocks),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads if isinstance(heads, int) else tuple(heads),
        norm_num_groups=norm_groups,
        **conditioning,
    )


def sd3_transformer(
    *,
    sample_size: int,
    latent_channels: int,
    layers: int,
    heads: int,
    head_dim: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    pos_embed_max_size: int,
    patch_size: int = 2,
    sd35: bool = False,
) -> Any:
    """An `SD3Transformer2DModel` (caption projection = heads x head dim, as in SD3); `sd35` adds SD3.5's
    qk RMS norm and a dual-attention first block."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=pos_embed_max_size,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )


def flux_transformer(
    *,
    latent_channels: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    guidance_embeds: bool,
    layers: int = 1,
    single_layers: int = 1,
    heads: int = 2,
    axes_dims_rope: Sequence[int] = (4, 4, 8),
) -> Any:
    """A `FluxTransformer2DModel` on 2x2-packed latents (in channels 4 x `latent_channels`); the head dim is
    the sum of the rope axes; `guidance_embeds` as FLUX.1-dev (True) or schnell (False)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=sum(axes_dims_rope),
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope),
    )


def ddpm_scheduler(prediction_type: str = "epsilon", *, set_alpha_to_one: bool | None = False) -> Any:
    """SD 1.5's `DDPMScheduler` (SD15_SCHEDULER). `set_alpha_to_one=None` leaves SD 1.5's DDIM key out of
    the config (as the digits base's was saved: a DDIM swap then takes DDIM's default, True)."""
    from diffusers import DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    config = {**SD15_SCHEDULER, "prediction_type": prediction_type}
    if set_alpha_to_one is None:
        del config["set_alpha_to_one"]
    else:
        config["set_alpha_to_one"] = set_alpha_to_one
    return DDPMScheduler.from_config(config)


def euler_scheduler() -> Any:
    """SDXL's `EulerDiscreteScheduler` (SDXL_SCHEDULER)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)


def flow_scheduler(shift: float = 3.0, *, dynamic_shifting: bool = False) -> Any:
    """A `FlowMatchEulerDiscreteScheduler` over 1000 steps: SD3's (shift 3.0), or with `dynamic_shifting`
    FLUX.1-dev's (FLUX_DYNAMIC_SHIFT, mu from the image token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {"num_train_timesteps": 1000, "shift": shift}
    return FlowMatchEulerDiscreteScheduler.from_config(
        config | (FLUX_DYNAMIC_SHIFT if dynamic_shifting else {})
    )
