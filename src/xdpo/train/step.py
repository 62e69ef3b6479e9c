"""The model side of one training step: latents, shared (t, eps), policy and reference errors.

e(x) = mean_{C,H,W} (model(x_t, c, t) - target)^2 per sample (DESIGN.md §3.1), computed for the policy
in one batched call on [w; l] and for the reference in inference mode.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from xdpo.models.load import encode_images, encode_prompts, prediction_target

RefForward = Callable[[Tensor, Tensor, Tensor], Tensor]


def per_sample_error(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """e = mean (or sum) over all non-batch dims of (pred - target)^2, in float32."""
    sq = (pred.float() - target.float()).pow(2)
    dims = list(range(1, sq.ndim))
    return sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)


def encode_batch(comps: Any, batch: dict, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Latents of [w; l] (shape [2B, C, h, w], float32) and the caption embeddings repeated for both."""
    device = gen.device
    pixels = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(device)
    latents = encode_images(comps.vae, pixels, gen).float()
    cond = encode_prompts(comps.tokenizer, comps.text_encoder, batch["captions"], device)
    return latents, cond.repeat(2, 1, 1)


def denoising_errors(
    comps: Any,
    unet: Any,
    reference: RefForward,
    latents: Tensor,
    cond: Tensor,
    timesteps: Tensor,
    gen: torch.Generator,
    *,
    reduction: str = "mean",
    autocast: Callable = nullcontext,
) -> tuple[Tensor, Tensor]:
    """Policy and reference errors on [w; l], shape [2B] each; one (t, eps) per pair shared by w and l."""
    sched = comps.noise_scheduler
    b = timesteps.shape[0]
    noise = torch.randn(latents[:b].shape, device=latents.device, generator=gen).repeat(2, 1, 1, 1)
    t2 = timesteps.repeat(2)
    noisy = sched.add_noise(latents, noise, t2)
    target = prediction_target(sched, latents, noise, t2)
    with torch.inference_mode(), autocast():
        ref_err = per_sample_error(reference(noisy, t2, cond), target, reduction)
    err = per_sample_error(unet(noisy, t2, encoder_hidden_states=cond).sample, target, reduction)
    return err, ref_err.clone()  # clone: leave inference mode, a normal tensor for autograd


def divergence_estimate(
    comps: Any,
    candidate: RefForward,
    initial: RefForward,
    latents: Tensor,
    cond: Tensor,
    gen: torch.Generator,
    *,
    estimator: str = "pred_mse",
    reduction: str = "mean",
    autocast: Callable = nullcontext,
) -> Tensor:
    """Per-sample divergence of the candidate from the initial model on `latents`, fresh uniform t and eps.

    pred_mse:  mean_{C,H,W} (pred_candidate - pred_initial)^2 — the forward-process approximation of
               KL(p_candidate || p_initial) (Kang et al. 2025, Eq. 7-8; the Gaussian reverse steps share
               their variance, so their KL is proportional to the squared difference of predictions).
    error_gap: e_candidate - e_initial — the difference of denoising errors (can be negative).
    """
    sched = comps.noise_scheduler
    k = latents.shape[0]
    t = torch.randint(0, sched.config.num_train_timesteps, (k,), device=latents.device, generator=gen)
    noise = torch.randn(latents.shape, device=latents.device, generator=gen)
    noisy = sched.add_noise(latents, noise, t)
    target = prediction_target(sched, latents, noise, t)
    with torch.inference_mode(), autocast():
        p_c, p_i = candidate(noisy, t, cond), initial(noisy, t, cond)
        if estimator == "pred_mse":
            d = per_sample_error(p_c, p_i, reduction)
        else:
            d = per_sample_error(p_c, target, reduction) - per_sample_error(p_i, target, reduction)
    return d.clone()


def make_optimizer(train_cfg: Any, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (torch, foreach) or Adafactor (transformers, fixed lr as Diffusion-DPO's SDXL runs)."""
    t = train_cfg
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            weight_decay=t.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
        eps=t.adam_epsilon,
        foreach=True,
    )
