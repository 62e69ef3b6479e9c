"""Build the digits-world base model: a genuine `StableDiffusionPipeline` folder, trained from scratch.

Recipe (`build_base`), all on CPU, deterministic for a given seed and thread count; the shipped
base took 29 min wall time (11 min autoencoder, 18 min UNet) on one core of a busy 2-core machine:
1. `AutoencoderKL` 32x32x3 -> 4x8x8 (0.24M params), trained on the real digits (random 2-px
   white-padded shifts) with ``loss = mse(x_hat, x) + KL_WEIGHT * mean KL(q(z|x) || N(0, I))``.
   KL_WEIGHT is tiny, as in SD: with 1e-3 the posterior std was 0.7x the latent std, so training
   latents (and the latents a DPO trainer samples with `latent_dist.sample()`) were mostly noise
   and the UNet conditioned poorly (72% prompted-digit accuracy); with 1e-6 it is ~0.013x.
2. ``scaling_factor = 1 / std(latent means)`` so the diffusion model sees unit-variance latents.
3. A small `CLIPTextModel` (hidden 16, 2 layers, 0.8M params, almost all the 49,408-token
   embedding) trained jointly with a small `UNet2DConditionModel` (block_out_channels (32, 64),
   cross-attention at both levels, 2 heads, the pooled text also added to the time embedding via
   `addition_embed_type="text"`; 1.05M params) on eps-prediction, ``loss = mse(unet(z_t, t, text(c)), eps)``, SD 1.x
   `scaled_linear` DDPM schedule (z_t from `xdpo.models.noise.DDPMProcess`), captions drawn from
   `data.TRAIN_TEMPLATES`, dropped to "" with probability CFG_DROP (for classifier-free guidance); EMA
   weights of both (diffusers' `EMAModel`) are saved.
4. `save_pretrained` with safety checker and feature extractor set to None.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.apps.digits.data import TRAIN_TEMPLATES, caption, load_digit_images
from xdpo.models.noise import DDPMProcess
from xdpo.models.small import components
from xdpo.objectives.timesteps import sample_timesteps

KL_WEIGHT = 1e-6  # SD-like: a near-deterministic encoder (posterior std << latent std)
CFG_DROP = 0.1
TEXT_HIDDEN = 16
VAE_BLOCKS = (16, 32, 32)


@dataclass(frozen=True)
class BuildRecipe:
    """Step counts and learning rates of one build; `quick()` is a seconds-long smoke build."""

    vae_steps: int = 2000
    vae_batch: int = 64
    vae_lr: float = 2e-3
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999

    @classmethod
    def quick(cls) -> BuildRecipe:
        return cls(vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8)


def make_vae():
    """The digits autoencoder: 32x32x3 -> 4x8x8 (blocks 16, 32, 32; `xdpo.models.small.components.vae`)."""
    return components.vae(blocks=VAE_BLOCKS, latent_channels=4, image_size=32, norm_groups=16)


def make_text_encoder(with_projection: bool = False):
    """The digits bases' small CLIP text encoder (the real 49,408-token vocabulary, hidden 16); the flow
    base uses two of them with a projection (`CLIPTextModelWithProjection`, as SD3's pipeline expects)."""
    return components.clip_text_encoder(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        heads=2,
        projection_dim=TEXT_HIDDEN,
        with_projection=with_projection,
    )


def make_unet():
    """Cross-attention at both levels, 2 heads (diffusers reads `attention_head_dim` as the number of heads:
    head dims 16, 32); the pooled text also enters every ResNet block through the time embedding
    (`addition_embed_type="text"`, TextTimeEmbedding)."""
    return components.unet(
        sample_size=8,
        blocks=(32, 64),
        cross_attention=(True, True),
        cross_attention_dim=TEXT_HIDDEN,
        heads=2,
        norm_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
    )


def make_scheduler():
    """SD 1.x's DDPM training schedule; sampling may swap in DDIM via `DDIMScheduler.from_config` (the
    saved config has no `set_alpha_to_one`, so DDIM takes its default)."""
    return components.ddpm_scheduler("epsilon", set_alpha_to_one=None)


def _images_tensor() -> torch.Tensor:
    grey, _ = load_digit_images(32)
    x = torch.from_numpy(grey).float().div(127.5).sub(1.0)
    return x[:, None].repeat(1, 3, 1, 1)  # [N, 3, 32, 32] in [-1, 1], white = +1


def _shift(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` px with white padding (one offset per batch)."""
    xp = torch.nn.functional.pad(x, (pad,) * 4, value=1.0)
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return xp[..., i : i + x.shape[-2], j : j + x.shape[-1]]


def _log(msg: str, log) -> None:
    if log:
        log(msg)


def train_vae(x: torch.Tensor, r: BuildRecipe, g: torch.Generator, log=print):
    """Train the autoencoder; return it in eval mode."""
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, r.vae_lr, total_steps=max(r.vae_steps, 2), pct_start=0.05
    )
    t0 = time.time()
    for step in range(r.vae_steps):
        xb = _shift(x[torch.randint(0, len(x), (r.vae_batch,), generator=g)], g)
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, xb)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == r.vae_steps - 1:
            _log(f"vae step {step}: mse {mse.item():.5f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)", log)
    return vae.eval().requires_grad_(False)


def train_unet_text(lat_mean, lat_std, labels, tokenizer, r: BuildRecipe, g: torch.Generator, log=print):
    """Train UNet + text encoder jointly on scaled latents; return them holding their EMA weights.

    Noise by `xdpo.models.noise.DDPMProcess` on the scheduler (x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,
    target eps), t uniform (`sample_timesteps`); EMA by diffusers' `EMAModel` (decay min(ema_decay,
    (1 + n) / (10 + n)) at its n-th update after the first, which copies the weights).
    """
    from diffusers.training_utils import EMAModel

    unet, text = make_unet(), make_text_encoder()
    process = DDPMProcess(make_scheduler())
    # caption table: [10 digits x T templates] + the empty caption (index -1)
    caps = [caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES] + [""]
    ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    n_t = len(TRAIN_TEMPLATES)
    params = list(unet.parameters()) + list(text.parameters())
    ema = EMAModel(params, decay=r.ema_decay)
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=1e-2)
    lr_s = torch.optim.lr_scheduler.OneCycleLR(
        opt, r.unet_lr, total_steps=max(r.unet_steps, 2), pct_start=0.05
    )
    labels = torch.as_tensor(labels)
    t0, run = time.time(), 0.0
    for step in range(r.unet_steps):
        idx = torch.randint(0, len(lat_mean), (r.unet_batch,), generator=g)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        cap = labels[idx] * n_t + torch.randint(0, n_t, (r.unet_batch,), generator=g)
        cap = torch.where(torch.rand(r.unet_batch, generator=g) < CFG_DROP, len(caps) - 1, cap)
        t = sample_timesteps(r.unet_batch, process.num_steps, sampling="uniform", generator=g)
        zt, target = process.noise(z0, torch.randn(z0.shape, generator=g), t)
        pred = unet(zt, process.model_timestep(t), text(ids[cap])[0]).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        run = descend(loss, opt, params, lr_s, ema, run if step else None)
        if step % 250 == 0 or step == r.unet_steps - 1:
            _log(f"unet step {step}: loss {run:.4f} ({time.time() - t0:.0f} s)", log)
    ema.copy_to(params)
    return unet.eval().requires_grad_(False), text.eval().requires_grad_(False)


def descend(loss: torch.Tensor, opt: Any, params: list, lr_s: Any, ema: Any, run: float | None) -> float:
    """One optimizer step of a base's denoiser (gradients clipped to norm 1, then its EMA); returns the
    running loss 0.98 run + 0.02 loss (the loss itself at the first step, `run` None)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lr_s.step()
    ema.step(params)
    return loss.item() if run is None else 0.98 * run + 0.02 * loss.item()


def build_base(
    out: str | Path,
    seed: int = 0,
    threads: int = 1,
    quick: bool = False,
    log=print,
    reuse_vae: str | Path | None = None,
) -> dict:
    """Rebuild the digits base pipeline into `out`; return a summary (also saved as xdpo_digits.json).

    Stage 1 (autoencoder) uses ``torch.Generator().manual_seed(seed)``, stage 2 (UNet + text encoder)
    ``manual_seed(seed + 1)``, so `reuse_vae` (a pipeline folder built with the same seed) skips stage 1
    and gives the same result.
    """
    from diffusers import StableDiffusionPipeline

    from xdpo.models.tokenizer import build_clip_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    r = BuildRecipe.quick() if quick else BuildRecipe()
    t_start = time.time()
    tokenizer = build_clip_tokenizer(out / "tokenizer")
    x = _images_tensor()
    _, labels = load_digit_images(32)
    if reuse_vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(reuse_vae) / "vae").eval().requires_grad_(False)
        _log(f"vae: reused from {reuse_vae}", log)
    else:
        vae = train_vae(x, r, g, log)
    t_vae = time.time() - t_start
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        rec_mse = torch.nn.functional.mse_loss(vae.decode(post.mean).sample, x).item()
    sf = float(1.0 / post.mean.std())
    post_std = float(post.std.mean() * sf)  # posterior noise in unit-variance latent units
    vae.register_to_config(scaling_factor=sf)
    _log(f"vae: reconstruction mse {rec_mse:.5f}, latent std {1 / sf:.3f} -> scaling_factor {sf:.4f}", log)
    _log(f"vae: mean posterior std {post_std:.4f} (scaled latents have std 1)", log)
    g2 = torch.Generator().manual_seed(seed + 1)
    unet, text = train_unet_text(post.mean * sf, post.std * sf, labels, tokenizer, r, g2, log)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # vocab.json + merges.txt (as in SD 1.x) load the same tokenizer; the 3.6 MB tokenizer.json is redundant
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    n_params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in [("vae", vae), ("text_encoder", text), ("unet", unet)]
    }
    summary = {
        "recipe": asdict(r),
        "quick": quick,
        "seed": seed,
        "threads": threads,
        "reused_vae": str(reuse_vae) if reuse_vae else None,
        "kl_weight": KL_WEIGHT,
        "cfg_drop": CFG_DROP,
        "scaling_factor": sf,
        "vae_reconstruction_mse": rec_mse,
        "vae_posterior_std_scaled": post_std,
        "params": n_params,
        "seconds": {"vae": round(t_vae, 1), "total": round(time.time() - t_start, 1)},
        "torch": torch.__version__,
    }
    (out / "xdpo_digits.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"saved {out} in {summary['seconds']['total']:.0f} s", log)
    return summary


def measure_accuracy(
    path: str | Path, n_per_digit: int = 10, seed: int = 0, prompts=None, **sampling
) -> dict:
    """Fraction of samples the labeller's classifier reads as the prompted digit (canonical prompts)."""
    from xdpo.apps.digits.labeller import alignment
    from xdpo.apps.digits.sampling import generate, load_pipeline

    prompts = prompts or [caption(d) for d in range(10)]
    prompts = [p for p in prompts for _ in range(n_per_digit)]
    images = generate(load_pipeline(path), prompts, seed=seed, progress=False, **sampling)
    acc = alignment(images, prompts)
    return {"accuracy": float(np.mean(acc)), "n": len(prompts), "images": images, "prompts": prompts}
