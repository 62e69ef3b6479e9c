"""Tiny random-weight pipelines of every family, in the real diffusers formats, for tests and benchmarks.

`build_pipeline(pipeline_class, out_dir, **options)` assembles the pipeline that `ASSEMBLERS` holds for
the family's pipeline class from `xdpo.models.small.components` and `save_pretrained`s it; its diffusers
class loads the folder offline. Every pipeline's VAE has two blocks, so images are
`resolution(sample_size)` = 2 x `sample_size` px. Weights are drawn after `torch.manual_seed(seed)`.

- `StableDiffusionPipeline` (sample_size 16, latent_channels 4, prediction_type): UNet (32, 64), cross-
  attention at the top level, CLIP hidden 32 (0.79M / 1.60M parameters, 1.58M the 49,408 x 32 token
  embeddings), VAE (32, 64); SD 1.5's DDPM schedule. ~16 MB on disk.
- `StableDiffusionXLPipeline` (sample_size 8, addition_time_embed_dim 8): "CLIP-L" hidden 16 and "CLIP-G"
  24 projected to 32 (a swapped or mis-concatenated encoder changes a shape); UNet (16, 32) with
  `text_time` conditioning, cross-attention over both (16 + 24), projection_class_embeddings_input_dim
  = 6 x addition_time_embed_dim + 32; SDXL's Euler scheduler; VAE (16, 32) with SDXL's scaling.
- `StableDiffusion3Pipeline` (sample_size 8, latent_channels 16, with_t5, sd35): CLIP-L (projected to 16)
  + CLIP-G, T5 (or none: the pipeline then conditions on zeros), MMDiT patch 2, 2 blocks of 4 x 8 heads,
  joint dim 48 (the CLIP states zero-padded to T5's width); shift-3 flow; SD3's VAE normalisation.
- `FluxPipeline` (sample_size 8, latent_channels 16, guidance_embeds): CLIP-L (pooled) + T5, 1 double
  + 1 single block (rope 4 + 4 + 8 = head dim 16), FLUX.1-dev's dynamic shifting, FLUX.1's VAE normalisation.
On disk: SDXL 17 MB, SD3 16 MB, Flux 8 MB, mostly CLIP token embeddings and the CLIP tokenizer folders.
Qwen-Image, FLUX.2 (dev, klein), Z-Image and Wan: `xdpo.models.small.recent_pipelines`.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError
from xdpo.models.small import components as c
from xdpo.models.small.recent_pipelines import RECENT_ASSEMBLERS
from xdpo.models.tokenizer import build_t5_tokenizer, clip_tokenizer, t5_tokenizer

VAE_BLOCKS = (32, 64)
"""The SD pipeline's VAE channels; every tiny pipeline's VAE has two blocks (downsampling x2)."""
FAMILY_VAE_BLOCKS = (16, 32)
"""The SDXL, SD3 and Flux pipelines' VAE: two blocks as VAE_BLOCKS, narrower."""
CLIP_L, CLIP_G, CLIP_G_PROJECTION, CLIP_FFN = 16, 24, 32, 37
"""Hidden sizes of the "CLIP-L" and "CLIP-G" encoders, CLIP-G's projection and every encoder's MLP width."""
T5_D_MODEL = 48

SDXL_VAE = {"scaling_factor": 0.13025}
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def resolution(sample_size: int) -> int:
    """Image side in pixels of a tiny pipeline with latents of side `sample_size`."""
    return sample_size * 2 ** (len(VAE_BLOCKS) - 1)


def _check_side(sample_size: int) -> None:
    if sample_size < 4 or sample_size % 2:
        raise ConfigError(f"sample_size must be even and >= 4 (UNet halving, 2x2 patches), got {sample_size}")


def _family_vae(latent_channels: int, sample_size: int, norm: dict[str, float], quant_conv: bool) -> Any:
    return c.vae(
        blocks=FAMILY_VAE_BLOCKS,
        latent_channels=latent_channels,
        image_size=resolution(sample_size),
        norm_groups=8,
        quant_conv=quant_conv,
        **norm,
    )


def _clip(hidden: int, projection: int | None = None) -> Any:
    return c.clip_text_encoder(
        hidden_size=hidden,
        intermediate_size=CLIP_FFN,
        projection_dim=projection,
        with_projection=projection is not None,
    )


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# ---- one assembler per pipeline class: (tokenizer folders, seed, options) -> pipeline ---------------------


def _sd(
    clip_dir, t5_dir, seed, *, sample_size: int = 16, latent_channels: int = 4, prediction_type="epsilon"
):
    from diffusers import StableDiffusionPipeline

    _check_side(sample_size)
    scheduler = c.ddpm_scheduler(prediction_type)
    tokenizer = clip_tokenizer(clip_dir)
    _seed(seed)
    unet = c.unet(
        sample_size=sample_size,
        latent_channels=latent_channels,
        blocks=(32, 64),
        cross_attention=(True, False),
        cross_attention_dim=32,
        heads=(2, 4),
    )
    vae = c.vae(blocks=VAE_BLOCKS, latent_channels=latent_channels, image_size=resolution(sample_size))
    text_encoder = _clip(32)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(clip_dir, t5_dir, seed, *, sample_size: int = 8, addition_time_embed_dim: int = 8):
    from diffusers import StableDiffusionXLPipeline

    _check_side(sample_size)
    tokenizer = clip_tokenizer(clip_dir)
    _seed(seed)
    text_encoder, text_encoder_2 = _clip(CLIP_L), _clip(CLIP_G, CLIP_G_PROJECTION)
    unet = c.unet(
        sample_size=sample_size,
        blocks=(16, 32),
        cross_attention=(False, True),
        cross_attention_dim=CLIP_L + CLIP_G,
        heads=(2, 4),
        norm_groups=8,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + CLIP_G_PROJECTION,
    )
    return StableDiffusionXLPipeline(
        vae=_family_vae(4, sample_size, SDXL_VAE, quant_conv=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=c.euler_scheduler(),
        add_watermarker=False,
    )


def _sd3(
    clip_dir,
    t5_dir,
    seed,
    *,
    sample_size: int = 8,
    latent_channels: int = 16,
    with_t5: bool = True,
    sd35: bool = False,
):
    from diffusers import StableDiffusion3Pipeline

    _check_side(sample_size)
    tokenizer = clip_tokenizer(clip_dir)
    t5_tok = t5_tokenizer(t5_dir) if with_t5 else None
    _seed(seed)
    text_encoder, text_encoder_2 = _clip(CLIP_L, CLIP_L), _clip(CLIP_G, CLIP_G_PROJECTION)
    transformer = c.sd3_transformer(
        sample_size=sample_size,
        latent_channels=latent_channels,
        layers=2,
        heads=4,
        head_dim=8,
        joint_attention_dim=T5_D_MODEL,  # >= 16 + 24: the CLIP states are zero-padded to T5's width
        pooled_projection_dim=CLIP_L + CLIP_G_PROJECTION,
        pos_embed_max_size=2 * sample_size,
        sd35=sd35,
    )
    vae = _family_vae(latent_channels, sample_size, SD3_VAE, quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=c.flow_scheduler(3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=c.t5_encoder(t5_tok, d_model=T5_D_MODEL) if with_t5 else None,
        tokenizer_3=t5_tok,
    )


def _flux(
    clip_dir, t5_dir, seed, *, sample_size: int = 8, latent_channels: int = 16, guidance_embeds: bool = True
):
    from diffusers import FluxPipeline

    _check_side(sample_size)
    tokenizer = clip_tokenizer(clip_dir)
    t5_tok = t5_tokenizer(t5_dir)
    _seed(seed)
    text_encoder = _clip(CLIP_L)
    transformer = c.flux_transformer(
        latent_channels=latent_channels,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_L,
        guidance_embeds=guidance_embeds,
    )
    vae = _family_vae(latent_channels, sample_size, FLUX_VAE, quant_conv=False)
    return FluxPipeline(
        scheduler=c.flow_scheduler(3.0, dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=c.t5_encoder(t5_tok, d_model=T5_D_MODEL),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


ASSEMBLERS: dict[str, Callable[..., Any]] = {
    "StableDiffusionPipeline": _sd,
    "StableDiffusionXLPipeline": _sdxl,
    "StableDiffusion3Pipeline": _sd3,
    "FluxPipeline": _flux,
    **RECENT_ASSEMBLERS,  # Qwen-Image, FLUX.2 dev and klein, Z-Image, Wan (`recent_pipelines`)
}
"""A family's pipeline class (`Family.pipeline_class`) -> its tiny pipeline's assembler."""


def build_pipeline(
    pipeline_class: str | type,
    out_dir: str | Path,
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    t5_tokenizer_dir: str | Path | None = None,
    **options: Any,
) -> Path:
    """Build the tiny random-weight pipeline of `pipeline_class` (a class or its name, e.g. a family's
    `pipeline_class`) with its `options` (module docstring) and `save_pretrained` it into `out_dir`.

    `tokenizer_dir` / `t5_tokenizer_dir` reuse tokenizer folders; by default they are built
    (`xdpo.models.tokenizer`). Returns the folder.
    """
    name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
    if name not in ASSEMBLERS:
        raise ConfigError(f"no tiny pipeline for {name!r} (choose from {', '.join(ASSEMBLERS)})")
    assemble = ASSEMBLERS[name]
    accepted = [p.name for p in inspect.signature(assemble).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"tiny {name}: unknown option {unknown[0]!r} (options: {', '.join(accepted)})")
    pipe = assemble(tokenizer_dir, t5_tokenizer_dir, seed, **options)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


def build_all(out_dir: str | Path, sample_size: int = 8) -> dict[str, Path]:
    """The tiny pipeline of every registered family that has one, under `out_dir/<family name>` (latents
    `sample_size`^2, tokenizers built once): family name -> folder."""
    from xdpo.models.families import families

    root = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="xdpo-tok-") as tmp:
        clip_dir, t5_dir = Path(tmp) / "clip", Path(tmp) / "t5"
        clip_tokenizer().save_pretrained(clip_dir)
        build_t5_tokenizer(t5_dir)
        toks = {"tokenizer_dir": clip_dir, "t5_tokenizer_dir": t5_dir}
        return {
            fam.name: build_pipeline(fam.pipeline_class, root / fam.name, sample_size=sample_size, **toks)
            for fam in families().values()
            if fam.pipeline_class in ASSEMBLERS
        }
