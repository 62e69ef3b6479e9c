"""Small denoisers, VAEs and schedulers of Qwen-Image, FLUX.2, Z-Image and Wan, in their diffusers classes.

Each is one function with size parameters; the schedulers carry the real checkpoints' configs (sources
below), so a tiny pipeline shifts its sigmas as the real one does. Random weights come from torch's global
generator (the caller seeds).

- `qwen_transformer` / `qwen_vae`: `QwenImageTransformer2DModel` on 2x2-packed latents (in channels 4 z),
  rope axes summing to the head dim; `AutoencoderKLQwenImage` (a causal 3-D VAE fed 1-frame videos) with
  per-channel `latents_mean` / `latents_std`.
- `flux2_transformer` / `flux2_vae`: `Flux2Transformer2DModel` (4 rope axes) on the VAE's 2x2-patchified
  latents (in channels 4 z); `AutoencoderKLFlux2` whose batch-norm statistics normalise the patchified
  latents (set to non-trivial values: an identity normalisation would hide a missing one).
- `zimage_transformer`: `ZImageTransformer2DModel` (patch 2, rope axes summing to dim / heads).
- `wan_transformer` / `wan_vae`: `WanTransformer3DModel` (patch 1 x 2 x 2, head dim split 4/4/4 by its 3-D
  rope) and `AutoencoderKLWan` (temporal x4 as Wan 2.1's, spatial x2) with per-channel normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
"""Qwen/Qwen-Image scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)."""
FLUX2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
"""black-forest-labs/FLUX.2-dev scheduler/scheduler_config.json (its pipeline computes mu itself)."""
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
"""Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json."""
WAN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}
"""Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (UniPCMultistepScheduler, 480p shift)."""


def _stats(n: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel latent (mean, std), fixed and far from (0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mean = (torch.rand(n, generator=g) - 0.5).tolist()
    std = (0.5 + torch.rand(n, generator=g)).tolist()
    return [round(x, 4) for x in mean], [round(x, 4) for x in std]


def qwen_transformer(
    *, z_dim: int, joint_attention_dim: int, layers: int = 1, heads: int = 2, axes: Sequence[int] = (4, 6, 6)
) -> Any:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=layers,
        attention_head_dim=sum(axes),
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        axes_dims_rope=tuple(axes),
    )


def qwen_vae(*, z_dim: int, base_dim: int = 8) -> Any:
    """Two levels (spatial x2, no temporal downsampling: images are 1-frame videos)."""
    from diffusers import AutoencoderKLQwenImage

    mean, std = _stats(z_dim, 1)
    return AutoencoderKLQwenImage(
        base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=mean, latents_std=std,
    )  # fmt: skip


def flux2_transformer(
    *, z_dim: int, joint_attention_dim: int, guidance_embeds: bool, heads: int = 2, axes=(4, 4, 4, 4)
) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * z_dim,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=sum(axes),
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=tuple(axes),
        guidance_embeds=guidance_embeds,
    )


def flux2_vae(*, z_dim: int, blocks: Sequence[int] = (16, 32), image_size: int = 16) -> Any:
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=tuple(blocks),
        layers_per_block=1,
        latent_channels=z_dim,
        norm_num_groups=8,
        sample_size=image_size,
    )
    mean, std = _stats(4 * z_dim, 2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.tensor(mean))
        vae.bn.running_var.copy_(torch.tensor(std) ** 2)
    return vae


def zimage_transformer(
    *, z_dim: int, cap_feat_dim: int, dim: int = 32, heads: int = 2, axes=(4, 6, 6)
) -> Any:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=z_dim, dim=dim, n_layers=1, n_refiner_layers=1,
        n_heads=heads, n_kv_heads=heads, cap_feat_dim=cap_feat_dim, axes_dims=list(axes), axes_lens=[64, 32, 32],
    )  # fmt: skip


def wan_transformer(*, z_dim: int, text_dim: int, heads: int = 2, head_dim: int = 12) -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=z_dim,
        out_channels=z_dim, text_dim=text_dim, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=64,
    )  # fmt: skip


def wan_vae(*, z_dim: int, base_dim: int = 8) -> Any:
    """Three levels: spatial x4, temporal x4 (Wan 2.1's: a clip of 4k + 1 frames has k + 1 latent frames)."""
    from diffusers import AutoencoderKLWan

    mean, std = _stats(z_dim, 3)
    return AutoencoderKLWan(
        base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=mean, latents_std=std, scale_factor_temporal=4, scale_factor_spatial=4,
    )  # fmt: skip


def flow_match_scheduler(config: dict[str, Any]) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def unipc_scheduler(config: dict[str, Any]) -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(config)
