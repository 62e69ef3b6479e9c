"""Load a diffusers pipeline of any family (SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1, Qwen-Image, FLUX.2, Z-Image,
Wan); LoRA; latents.

The family is read from `model_index.json` (`_class_name`) unless `model.family` names it. The pipeline
is loaded with its own diffusers class, so every component gets the class and config it was saved
with; the trainer keeps the pipeline for its `encode_prompt` (train and sample condition alike).
The policy is the family's denoiser (full fine-tune) or the denoiser with peft LoRA adapters; the
reference is a frozen copy (full) or the same denoiser with adapters disabled (LoRA, no second copy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError
from xdpo.models.families import Family, family_of_class, get_family, pipeline_classes
from xdpo.models.lora import adapters_disabled, add_lora, add_text_lora, tuner_layers  # noqa: F401 (their home)
from xdpo.models.named import resolve_named
from xdpo.quiet import progress_bars_off

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def half_precision(mixed_precision: str) -> torch.dtype | None:
    """The dtype of a half-precision setting (fp16, bf16), None for fp32."""
    dtype = DTYPES[mixed_precision]
    return None if dtype == torch.float32 else dtype


@dataclass
class Components:
    family: Family
    path: str  # the resolved pipeline folder or hub id
    pipe: Any  # the loaded pipeline (its encode_prompt is used for the conditions)
    denoiser: Any
    vae: Any
    scheduler: Any  # the training scheduler (DDPM for UNet families, the flow scheduler otherwise)
    text_encoders: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    options: Any = None  # the config's `family` section: the family's own knobs (its `Option`s)
    text_lora: dict[str, Any] = field(default_factory=dict)
    """The text encoders whose LoRA adapters train (`model.lora_text_encoder`), by component: their
    conditions are encoded with autograd each step, the reference's with the adapters off."""

    @property
    def unet(self) -> Any:  # SD-era name of the denoiser
        return self.denoiser


def resolve_pretrained(pretrained: str) -> str:
    """A named model (`digits`, `digits-flow`: `xdpo.models.named`) -> its folder; anything else unchanged
    (a folder or hub id). A path that exists wins over a name."""
    if not Path(pretrained).exists():
        folder = resolve_named(pretrained)
        if folder is not None:
            return str(folder)
    return pretrained


def read_model_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """model_index.json of a folder or hub id (the hub cache first: `xdpo.models.hub`); ConfigError when
    unreadable, with one line saying why (no such folder, offline, unreachable, gated) and what to do."""
    import json

    path = Path(resolve_pretrained(pretrained))
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ConfigError(
                f"model.pretrained: {path} has no model_index.json (not a diffusers pipeline folder)"
            )
        return json.loads(index.read_text())
    name = str(pretrained)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConfigError(
            f"model.pretrained: {name} does not exist (neither a folder nor a hub id owner/name)"
        )
    from xdpo.models.hub import hub_file

    found = hub_file(name, "model_index.json", revision)
    try:
        return json.loads(found.read_text())
    except ValueError as e:
        raise ConfigError(f"model.pretrained: model_index.json of {name} is not JSON ({e})") from None


def check_pipeline(pretrained: str, family: str = "auto", revision: str | None = None) -> Family:
    """The pipeline's family, with one clear line for a folder that no family can train."""
    info = read_model_index(pretrained, revision)
    class_name = info.get("_class_name", "?")
    fam = get_family(family) if family != "auto" else family_of_class(class_name)
    if fam is None:
        raise ConfigError(
            f"model.pretrained: {resolve_pretrained(pretrained)} is a {class_name}, not a family xdpo trains "
            f"({', '.join(pipeline_classes())}); set model.family to force one"
        )
    missing = [c for c in (fam.denoiser, "vae", "scheduler", "text_encoder", "tokenizer") if c not in info]
    if missing:
        raise ConfigError(
            f"model.pretrained: {resolve_pretrained(pretrained)} lacks component(s) {', '.join(missing)} "
            f"of a {fam.pipeline_class}"
        )
    fam.check_index(info)
    return fam


def null_components(info: dict[str, Any]) -> dict[str, None]:
    """Components that model_index.json records as null (e.g. SD3 saved without T5), as None overrides:
    diffusers (0.42) refuses such a folder unless they are passed as None too."""
    return {
        k: None for k, v in info.items() if not k.startswith("_") and isinstance(v, list) and v[:1] == [None]
    }


def pipeline_kwargs(model_cfg: Any, fam: Family, options: Any) -> dict[str, Any]:
    """Component overrides for loading (and for saving final/): null components, the family's (from its
    `options`, the config's `family` section), `model.vae`."""
    nulls = null_components(read_model_index(model_cfg.pretrained, model_cfg.revision))
    kw: dict[str, Any] = {"revision": model_cfg.revision, **nulls, **fam.load_kwargs(options)}
    if model_cfg.vae:
        from diffusers import AutoencoderKL

        try:
            kw["vae"] = AutoencoderKL.from_pretrained(resolve_pretrained(model_cfg.vae))
        except OSError as e:
            raise ConfigError(f"model.vae: cannot load {model_cfg.vae}: {str(e).splitlines()[0]}") from None
    return kw


def load_components(
    model_cfg: Any, options: Any, skip: tuple[str, ...] = (), text_dtype: torch.dtype | None = None
) -> Components:
    """The pipeline of `model.pretrained` through its family's diffusers class, and its training scheduler.

    `options`: the config's `family` section (the family's own knobs); `skip`: components not loaded
    (None), e.g. the text encoders of a run that reads `data.cache`. `text_dtype` (a half-precision run's):
    the text encoders' dtype, given to `from_pretrained` as the pipelines take `torch_dtype`, so that
    transformers keeps their `_keep_in_fp32_modules` in fp32 (T5's `wo`, which overflows in fp16); the
    other components load in fp32."""
    fam = check_pipeline(model_cfg.pretrained, model_cfg.family, model_cfg.revision)
    path = resolve_pretrained(model_cfg.pretrained)
    kw = {**pipeline_kwargs(model_cfg, fam, options), **dict.fromkeys(skip)}
    if text_dtype is not None:
        encoders = [
            k
            for k in read_model_index(model_cfg.pretrained, model_cfg.revision)
            if k.startswith("text_encoder")
        ]
        kw["dtype"] = {"default": torch.float32, **dict.fromkeys(encoders, text_dtype)}
    try:
        with progress_bars_off():  # "Loading pipeline components", "Loading weights"
            pipe = fam.pipeline_cls().from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained: cannot load {path}: {str(e).splitlines()[0]}") from None
    parts = pipe.components
    if fam.process == "ddpm":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    else:
        scheduler = parts["scheduler"]
    encoders = {k: v for k, v in parts.items() if k.startswith("text_encoder") and v is not None}
    tokenizers = {k: v for k, v in parts.items() if k.startswith("tokenizer") and v is not None}
    for m in (parts["vae"], *encoders.values()):
        m.requires_grad_(False).eval()
    return Components(
        family=fam,
        path=path,
        pipe=pipe,
        denoiser=parts[fam.denoiser],
        vae=parts["vae"],
        scheduler=scheduler,
        text_encoders=encoders,
        tokenizers=tokenizers,
        options=options,
    )


def frozen_copy(model: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The reference denoiser for full fine-tuning: a frozen copy in `dtype`."""
    ref = copy.deepcopy(model).to(device=device, dtype=dtype)
    return ref.requires_grad_(False).eval()


def latent_params(vae: Any, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE posterior's (mean, logvar), unscaled, float32."""
    dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
    return dist.mean.float(), dist.logvar.float()


def vae_scale_factor(vae: Any) -> int:
    """How many pixels one latent spans per side, as the pipelines compute it: Wan's VAE config says it
    (`scale_factor_spatial`), Qwen-Image's 3-D VAE downsamples once per level (2^len(temperal_downsample)),
    the 2-D VAEs 2^(levels - 1)."""
    cfg = vae.config
    if getattr(cfg, "scale_factor_spatial", None):
        return int(cfg.scale_factor_spatial)
    if getattr(cfg, "temperal_downsample", None) is not None:
        return 2 ** len(cfg.temperal_downsample)
    return 2 ** (len(cfg.block_out_channels) - 1)


def vae_temporal_factor(vae: Any) -> int:
    """Frames per latent frame after the first of a video VAE (Wan: `scale_factor_temporal`, 4); 1 otherwise."""
    return int(getattr(vae.config, "scale_factor_temporal", None) or 1)


def check_data_shape(fam: Family, data: Any, vae: Any) -> None:
    """`data.resolution` on the family's patch grid behind this VAE, and `data.num_frames` as the family and
    its VAE take clips (one line naming the key otherwise)."""
    fam.check_resolution(data.resolution, vae_scale_factor(vae))
    fam.check_frames(int(getattr(data, "num_frames", 0) or 0), vae_temporal_factor(vae))


def scale_latents(vae: Any, z: Tensor) -> Tensor:
    """(z - shift_factor) * scaling_factor, the space the SD-era and Flux.1 denoisers work in (the families'
    default `Family.to_latents`)."""
    from xdpo.models.families.spec import scaled_latents

    return scaled_latents(vae, z)


@torch.no_grad()
def encode_images(vae: Any, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scaled VAE latents: a sample of the posterior, as Diffusion-DPO."""
    dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
    return scale_latents(vae, dist.sample(generator=generator))
