"""Load Stable Diffusion components from a diffusers pipeline folder or hub id; LoRA; targets.

The policy is the pipeline's UNet (full fine-tune) or the UNet with peft LoRA adapters; the
reference is a frozen copy (full) or the same UNet with adapters disabled (LoRA, no second copy).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xdpo.config import ModelConfig
from xdpo.errors import ConfigError

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any


NAMED_MODELS = {"digits": "the digits-world base shipped with xdpo"}


def resolve_pretrained(pretrained: str) -> str:
    """`digits` -> the shipped digits base folder; anything else unchanged (a folder or hub id)."""
    if pretrained == "digits" and not Path(pretrained).exists():
        from xdpo.digits import base_model_path

        return str(base_model_path())
    return pretrained


def check_pipeline(pretrained: str) -> None:
    """Clear errors for a folder that is not an SD 1.x/2.x pipeline (hub ids are left to diffusers)."""
    path = Path(resolve_pretrained(pretrained))
    pretrained = str(path)
    if not path.exists():
        if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
            raise ConfigError(f"model.pretrained: {pretrained} is neither a folder nor a hub id (owner/name)")
        return
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"model.pretrained: {path} has no model_index.json (not a diffusers pipeline folder)"
        )
    info = json.loads(index.read_text())
    if "text_encoder_2" in info:
        raise ConfigError(f"model.pretrained: {path} is an SDXL pipeline; SDXL training is not supported yet")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in info]
    if missing:
        raise ConfigError(f"model.pretrained: {path} lacks component(s) {', '.join(missing)}")


def load_components(cfg: ModelConfig) -> Components:
    """UNet, VAE, text encoder, tokenizer and the training noise scheduler (DDPM, from the pipeline's config)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_pipeline(cfg.pretrained)
    pretrained = resolve_pretrained(cfg.pretrained)
    kw = {"revision": cfg.revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    except OSError as e:
        raise ConfigError(
            f"model.pretrained: cannot load {cfg.pretrained}: {str(e).splitlines()[0]}"
        ) from None
    for m in (vae, text_encoder):
        m.requires_grad_(False).eval()
    return Components(unet, vae, text_encoder, tokenizer, noise_scheduler)


def add_lora(unet: Any, cfg: ModelConfig) -> None:
    """Attach LoRA adapters (peft, through diffusers' integration); only they are trainable."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(cfg.lora_targets),
    )
    try:
        unet.add_adapter(lora)
    except ValueError as e:
        raise ConfigError(f"model.lora_targets: {e}") from None
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable adapter weights in fp32 under mixed precision


def frozen_copy(unet: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The reference UNet for full fine-tuning: a frozen copy in `dtype`."""
    ref = copy.deepcopy(unet).to(device=device, dtype=dtype)
    return ref.requires_grad_(False).eval()


@contextmanager
def adapters_disabled(unet: Any):
    """Reference = the base UNet: LoRA adapters off inside the block."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def prediction_target(noise_scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """Regression target by the scheduler's prediction type: eps, v (Salimans & Ho 2022) or x0."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ConfigError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, captions: list[str], device: torch.device) -> Tensor:
    """CLIP last hidden states [B, 77, D] as SD 1.x/2.x condition on them."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_images(vae: Any, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """VAE latents (a sample of the posterior, as Diffusion-DPO) times `scaling_factor`."""
    dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
    latents = dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor
