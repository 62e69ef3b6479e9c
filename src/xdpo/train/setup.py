"""Setting up a run's models: the family's pipeline, LoRA, the reference, the noise process, the probe set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xdpo.config import Config
from xdpo.errors import XdpoError
from xdpo.models.load import DTYPES, Components, add_lora, half_precision, load_components, vae_scale_factor
from xdpo.models.noise import PROCESSES
from xdpo.objectives.timesteps import minmax_lambda_table
from xdpo.train.batches import mix_seed
from xdpo.train.reference import Reference

LOSS_KEYS = ("beta", "eta", "gamma", "n", "alpha", "label_smoothing", "logratio_scale", "clamp")


def resolve_timesteps(cfg: Config, process_kind: str) -> None:
    """`timesteps.sampling=auto` -> uniform (DDPM families, Diffusion-DPO) or logit_normal (flow, SD3)."""
    if cfg.timesteps.sampling == "auto":
        cfg.timesteps.sampling = "logit_normal" if process_kind == "flow" else "uniform"
    if cfg.loss.beta_schedule == "flow" and process_kind != "flow":
        raise XdpoError(
            "loss.beta_schedule: `flow` (beta (1 - sigma)^2, Flow-DPO) applies to flow-matching models "
            "(SD3, Flux); this model is a DDPM model"
        )


def make_process(cfg: Config, comps: Components) -> Any:
    """The family's noise process; Flux's dynamic shift uses the training resolution's token count."""
    kind = comps.family.process
    if kind == "ddpm":
        return PROCESSES[kind](comps.scheduler)
    vae_scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    side = cfg.data.resolution // vae_scale
    return PROCESSES[kind](comps.scheduler, image_seq_len=(side // 2) ** 2)


def place_frozen(comps: Components, mixed_precision: str, device: torch.device) -> None:
    """The VAE and text encoders on `device` in the mixed-precision dtype (what they encode in); the text
    encoders were loaded in it (`load_components(text_dtype=...)`, keeping T5's fp32 layers)."""
    weight_dtype = DTYPES[mixed_precision]
    # SDXL's VAE overflows in fp16 (unless it is the fp16-fix VAE, whose config says force_upcast: false)
    upcast = weight_dtype == torch.float16 and getattr(comps.vae.config, "force_upcast", False)
    comps.vae.to(device, dtype=torch.float32 if upcast else weight_dtype)
    for frozen in comps.text_encoders.values():
        frozen.to(device)


def load_models(cfg: Config, device: torch.device) -> tuple[Components, Any, Any, Reference, list]:
    """(components, process, denoiser, reference, trainable params), everything on `device`.

    With `data.cache` the text encoders and tokenizers are not loaded and the VAE stays on the CPU,
    never called (its config scales the latents)."""
    t = cfg.train
    if cfg.data.cache:
        from xdpo.data.cache import text_components

        comps = load_components(cfg.model, skip=text_components(cfg))
    else:
        comps = load_components(cfg.model, text_dtype=half_precision(t.mixed_precision))
        place_frozen(comps, t.mixed_precision, device)
    comps.family.check_resolution(cfg.data.resolution, vae_scale_factor(comps.vae))
    weight_dtype = DTYPES[t.mixed_precision]
    process = make_process(cfg, comps)
    resolve_timesteps(cfg, process.kind)
    ts = cfg.timesteps
    if ts.sampling == "skewed" and ts.bins > process.num_steps:
        raise XdpoError(f"timesteps.bins: {ts.bins} bins for {process.num_steps} timesteps")
    model, lora = comps.denoiser, cfg.model.lora_rank > 0
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if lora:
        model.to(device) if weight_dtype == torch.float32 else model.to(device, dtype=weight_dtype)
        add_lora(model, cfg.model)
    ref_dtype = weight_dtype if cfg.model.reference_dtype == "auto" else DTYPES[cfg.model.reference_dtype]
    reference = Reference(cfg.reference, comps.family, model, lora=lora, dtype=ref_dtype, device=device)
    if not lora:
        model.to(device)
        model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return comps, process, model, reference, params


def lambda_table(cfg: Config, process: Any) -> torch.Tensor | None:
    return minmax_lambda_table(process.weighting_basis()) if cfg.timesteps.weighting == "snr" else None


def loss_kwargs(cfg: Config) -> dict[str, Any]:
    lc = cfg.loss
    kw = {k: getattr(lc, k) for k in LOSS_KEYS}
    if lc.objective == "pair":
        kw.update(divergence=lc.divergence, outer=lc.outer)
    return kw


@torch.no_grad()
def build_probe(cfg: Config, pairs: Any, n_pairs: int, m: Any, rank: int, world: int, collate: Any) -> None:
    """The periodic reference's probe set: `probe_size` preferred images drawn once (seeded, apart from
    the training order), this process's share encoded and handed to the reference."""
    from xdpo.train.step import encode_batch

    size = min(cfg.reference.probe_size, n_pairs)
    order = np.random.default_rng([cfg.seed, 0x9E0BE]).permutation(n_pairs)[:size]
    per = -(-size // world)  # as many on every process: a sharded model's forwards are collectives
    mine = [int(order[(rank + world * j) % size]) for j in range(per)]
    batch = collate([pairs[(i, mix_seed(cfg.seed, 0x9E0BE, i))] for i in mine])
    device = next(m.reference.base.parameters()).device if cfg.data.cache else m.comps.vae.device
    gen = torch.Generator(device).manual_seed(mix_seed(cfg.seed, 0x9E0BE, rank))
    if "pixel" in batch:  # per-image data: the probe is its images
        from xdpo.train.step import encode_images_batch

        latents, cond = encode_images_batch(m.comps, batch, gen, m.sample_posterior)
    else:
        latents, cond = encode_batch(m.comps, batch, gen, m.sample_posterior)
    k = len(mine)
    m.reference.set_probe(latents[:k], {key: v[:k] for key, v in cond.items()})
