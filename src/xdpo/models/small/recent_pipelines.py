"""Tiny random-weight Qwen-Image, FLUX.2 (dev, klein), Z-Image and Wan pipelines, in the real diffusers formats.

Assemblers of `xdpo.models.small.pipelines.ASSEMBLERS` (same signature: tokenizer folders, seed, options);
every tokenizer is built offline (`chat_encoders`; Wan reuses the small T5 tokenizer, as Wan's UMT5 is a T5
tokenizer). Images are 16 x 16 px at the default sample_size 8 (VAEs downsample x2, as the other tiny
pipelines'), Wan clips 32 x 32 px (its VAE downsamples x4 in space and time).

- `QwenImagePipeline` (sample_size 8, z_dim 4): Qwen2.5-VL hidden 32 (2 layers), 1 MMDiT block (2 heads of
  16, rope 4 + 6 + 6), the 3-D VAE with per-channel normalisation; Qwen-Image's scheduler config.
- `Flux2Pipeline` (sample_size 8, z_dim 4): Mistral3 (30 layers of width 16: the pipeline stacks layers 10,
  20, 30: joint dim 48), 1 + 1 blocks with the guidance embedding (FLUX.2-dev), the batch-norm VAE.
- `Flux2KleinPipeline` (sample_size 8, z_dim 4, is_distilled): Qwen3 (27 layers of width 16: layers 9, 18,
  27), no guidance embedding, the pipeline's `is_distilled` flag (klein 4B base: false; 4B: true).
- `ZImagePipeline` (sample_size 8, z_dim 4): Qwen3Model (2 layers, the pipeline reads the second-to-last
  hidden state), the Z-Image transformer (dim 32, patch 2), an AutoencoderKL with FLUX.1's normalisation.
- `WanPipeline` (sample_size 8, z_dim 4): UMT5 (2 layers, d_model 48), WanTransformer3DModel (1 block,
  2 heads of 12), AutoencoderKLWan (x4 in time and space), Wan 2.1's UniPC scheduler (flow shift 3).
"""

from __future__ import annotations

from typing import Any

from xdpo.models.small import chat_encoders as ce
from xdpo.models.small import components as c
from xdpo.models.small import dit_components as d
from xdpo.models.tokenizer import t5_tokenizer

Z_DIM = 4
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
"""Z-Image's VAE is FLUX.1's (Tongyi-MAI/Z-Image-Turbo vae/config.json)."""


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _qwenimage(clip_dir, t5_dir, seed, *, sample_size: int = 8, z_dim: int = Z_DIM):
    from diffusers import QwenImagePipeline

    tok = ce.qwen_tokenizer()
    _seed(seed)
    encoder = ce.qwen25_vl_encoder(tok, hidden=32)
    return QwenImagePipeline(
        scheduler=d.flow_match_scheduler(d.QWEN_IMAGE_SCHEDULER),
        vae=d.qwen_vae(z_dim=z_dim),
        text_encoder=encoder,
        tokenizer=tok,
        transformer=d.qwen_transformer(z_dim=z_dim, joint_attention_dim=32),
    )


def _flux2(clip_dir, t5_dir, seed, *, sample_size: int = 8, z_dim: int = Z_DIM):
    from diffusers import Flux2Pipeline

    tok = ce.mistral_tokenizer()
    _seed(seed)
    encoder = ce.mistral3_encoder(tok, hidden=16, layers=30)
    return Flux2Pipeline(
        scheduler=d.flow_match_scheduler(d.FLUX2_SCHEDULER),
        vae=d.flux2_vae(z_dim=z_dim, image_size=2 * sample_size),
        text_encoder=encoder,
        tokenizer=tok,
        transformer=d.flux2_transformer(z_dim=z_dim, joint_attention_dim=3 * 16, guidance_embeds=True),
    )


def _flux2_klein(
    clip_dir, t5_dir, seed, *, sample_size: int = 8, z_dim: int = Z_DIM, is_distilled: bool = False
):
    from diffusers import Flux2KleinPipeline

    tok = ce.qwen_tokenizer()
    _seed(seed)
    encoder = ce.qwen3_encoder(tok, hidden=16, layers=27)
    return Flux2KleinPipeline(
        scheduler=d.flow_match_scheduler(d.FLUX2_SCHEDULER),
        vae=d.flux2_vae(z_dim=z_dim, image_size=2 * sample_size),
        text_encoder=encoder,
        tokenizer=tok,
        transformer=d.flux2_transformer(z_dim=z_dim, joint_attention_dim=3 * 16, guidance_embeds=False),
        is_distilled=is_distilled,
    )


def _zimage(clip_dir, t5_dir, seed, *, sample_size: int = 8, z_dim: int = Z_DIM):
    from diffusers import ZImagePipeline

    tok = ce.qwen_tokenizer()
    _seed(seed)
    encoder = ce.qwen3_encoder(tok, hidden=16, layers=2, causal_lm=False)
    vae = c.vae(
        blocks=(16, 32), latent_channels=z_dim, image_size=2 * sample_size, norm_groups=8, quant_conv=False,
        **FLUX_VAE,
    )  # fmt: skip
    return ZImagePipeline(
        scheduler=d.flow_match_scheduler(d.ZIMAGE_SCHEDULER),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        transformer=d.zimage_transformer(z_dim=z_dim, cap_feat_dim=16),
    )


def _wan(clip_dir, t5_dir, seed, *, sample_size: int = 8, z_dim: int = Z_DIM):
    from diffusers import WanPipeline

    tok = t5_tokenizer(t5_dir)
    _seed(seed)
    encoder = ce.umt5_encoder(tok, d_model=48)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=encoder,
        vae=d.wan_vae(z_dim=z_dim),
        scheduler=d.unipc_scheduler(d.WAN_SCHEDULER),
        transformer=d.wan_transformer(z_dim=z_dim, text_dim=48),
    )


RECENT_ASSEMBLERS: dict[str, Any] = {
    "QwenImagePipeline": _qwenimage,
    "Flux2Pipeline": _flux2,
    "Flux2KleinPipeline": _flux2_klein,
    "ZImagePipeline": _zimage,
    "WanPipeline": _wan,
}
