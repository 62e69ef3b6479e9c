"""One micro-step of preference training, for every model family (docs/design.md §2, §8).

e(x) = mean_{C,H,W} (prediction - target)^2 per sample, for the policy in one batched call on [w; l]
and for the reference in inference mode; one (t, eps) per pair, shared by w and l (per image for KTO,
whose images are independent, as Diffusion-KTO trains).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xdpo.errors import XdpoError
from xdpo.models.load import Components, encode_images, latent_params, scale_latents
from xdpo.objectives import UNIT_LABEL_EXACT, LossOutput, kto_images_loss, objective_loss
from xdpo.objectives.timesteps import sample_timesteps

NEEDS_REFERENCE = {"pair": True, "kto": True, "sft": False}
"""Objectives that use the reference's errors; a reference-free one skips the reference forward."""


def per_sample_error(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """e = mean (or sum) over all non-batch dims of (pred - target)^2, in float32."""
    sq = (pred.float() - target.float()).pow(2)
    dims = list(range(1, sq.ndim))
    return sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)


def space_error(m: Any, pred: Tensor, noisy: Tensor, t: Tensor, eps: Tensor, target: Tensor) -> Tensor:
    """Per-sample error in `loss.error_space`: against the native target, or as a noise prediction vs eps."""
    lc = m.loss_cfg
    if lc.error_space == "epsilon":
        return per_sample_error(m.process.to_epsilon(pred, noisy, t), eps, lc.error_reduction)
    return per_sample_error(pred, target, lc.error_reduction)


class KTOReferencePoint:
    """Diffusion-KTO's z0: the mean implicit reward g = e_ref - e_theta over a running window of the
    last `size` images of all processes (one optimizer step's worth), so that it never degenerates to
    the two images of one pair. Its contents are saved with checkpoints (exact resume)."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=max(size, 1))

    def update(self, g: Tensor) -> Tensor:
        self.values.extend(g.detach().float().flatten().tolist())
        return torch.tensor(sum(self.values) / len(self.values), device=g.device)

    def state(self) -> list[float]:
        return list(self.values)

    def load(self, values: list[float]) -> None:
        self.values.clear()
        self.values.extend(values)


@dataclass
class TrainModels:
    """What a step needs: the pipeline parts, the noise process, the policy (as prepared by accelerate)
    and the reference; `settings` are the run's loss and timestep configs."""

    comps: Components
    process: Any
    policy: Any
    reference: Any
    loss_cfg: Any
    timestep_cfg: Any
    loss_kw: dict[str, Any]
    lambda_table: Tensor | None = None
    autocast: Callable = nullcontext
    gather: Callable[[Tensor], Tensor] = lambda x: x  # noqa: E731 - identity on one process
    rank: int = 0
    # no-autograd passes (reference, divergence): inference mode, or no_grad under FSDP2, whose forward
    # hooks reuse gathered parameter buffers across passes (inference tensors may not be reused later)
    frozen: Callable = torch.inference_mode
    kto_point: KTOReferencePoint = field(default_factory=lambda: KTOReferencePoint(2))
    sample_posterior: bool = True  # data.sample_posterior: z ~ the VAE posterior, or its mean


@dataclass
class StepOutput:
    out: LossOutput
    timesteps: Tensor  # [B] per pair (KTO: the winners' t)
    weight: Tensor | None  # [B] lambda(t) multiplying beta, or None


@torch.no_grad()
def encode_batch(
    comps: Components, batch: dict, gen: torch.Generator, sample: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """Latents of [w; l] ([2B, C, h, w], float32) and the family's conditions for [w; l]; a cached batch
    (`xdpo.data.cache`) goes to `cached_batch`. `sample`: a posterior sample, else the posterior mean."""
    if "mean" in batch:
        return cached_batch(comps, batch, gen, sample)
    device = gen.device
    pixels = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(device)
    if sample:
        latents = encode_images(comps.vae, pixels, gen).float()
    else:
        latents = scale_latents(comps.vae, latent_params(comps.vae, pixels)[0]).float()
    text = comps.family.encode_text(comps, batch["captions"], device)
    cond = {k: torch.cat([v, v]) for k, v in text.items()}
    extra = comps.family.image_conditions(comps, batch, latents.shape[0])
    cond.update({k: v.to(device) for k, v in extra.items()})
    return latents, cond


@torch.no_grad()
def cached_batch(
    comps: Components, batch: dict, gen: torch.Generator, sample: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """`encode_batch` from cached posterior parameters and conditions; no VAE or text encoder runs.

    z = mean + exp(logvar / 2) eps with eps drawn from `gen` in the cache's dtype: the draw
    `encode_images` makes (diffusers' posterior `sample`), so resume stays exact and a cached fp32 run
    equals an uncached one. The family's image conditions see the pixel size through a meta tensor."""
    device = gen.device
    z = batch["mean"].to(device)
    if sample:
        eps = torch.randn(z.shape, generator=gen, device=device, dtype=z.dtype)
        z = z + torch.exp(0.5 * batch["logvar"].to(device)) * eps
    latents = scale_latents(comps.vae, z).float()
    cond = {k: torch.cat([v, v]).to(device) for k, v in batch["cond"].items()}
    n = latents.shape[0]
    view = {k: batch[k] for k in ("original_size", "crop_top_left") if k in batch}
    view["pixel_w"] = torch.empty(n // 2, 3, *batch["pixel_size"], device="meta")
    cond.update({k: v.to(device) for k, v in comps.family.image_conditions(comps, view, n).items()})
    return latents, cond


def step_weight(m: TrainModels, t: Tensor) -> Tensor | None:
    """lambda(t): Kang et al.'s SNR weight and/or Flow-DPO's beta_t / beta = (1 - sigma)^2."""
    w = None if m.lambda_table is None else m.lambda_table.to(t.device)[t]
    if m.loss_cfg.beta_schedule == "flow":
        sched = (1 - m.process.noise_level(t)) ** 2
        w = sched if w is None else w * sched
    return w


@torch.no_grad()
def encode_images_batch(comps: Components, batch: dict, gen: torch.Generator, sample: bool = True):
    """Latents [N, C, h, w] and conditions of a per-image batch (`data.format=images`)."""
    device = gen.device
    pixels = batch["pixel"].to(device)
    if sample:
        latents = encode_images(comps.vae, pixels, gen).float()
    else:
        latents = scale_latents(comps.vae, latent_params(comps.vae, pixels)[0]).float()
    cond = dict(comps.family.encode_text(comps, batch["captions"], device))
    view = {"pixel_w": pixels, **{k: batch[k] for k in ("original_size", "crop_top_left") if k in batch}}
    cond.update({k: v.to(device) for k, v in comps.family.image_conditions(comps, view, len(pixels)).items()})
    return latents, cond


def image_step(m: TrainModels, batch: dict, gen: torch.Generator) -> StepOutput:
    """Diffusion-KTO on independent images: own (t, eps) per image, reference point over a window."""
    ts, proc = m.timestep_cfg, m.process
    latents, cond = encode_images_batch(m.comps, batch, gen, m.sample_posterior)
    n = latents.shape[0]
    t = sample_timesteps(
        n, proc.num_steps, sampling=ts.sampling, bins=ts.bins, gamma=ts.gamma,
        mean=ts.mean, std=ts.std, generator=gen, device=latents.device,
    )  # fmt: skip
    eps = torch.randn(latents.shape, device=latents.device, generator=gen)
    noisy, target = proc.noise(latents, eps, t)
    model_t = proc.model_timestep(t)

    def errors(pred: Tensor) -> Tensor:
        return space_error(m, pred, noisy, t, eps, target)

    with m.frozen(), m.autocast():
        ref_err = errors(m.reference.predict(noisy, model_t, cond))
    ref_err = ref_err.clone()
    err = errors(m.comps.family.predict(m.policy, noisy, model_t, cond))
    weight = step_weight(m, t)
    z0 = m.kto_point.update(m.gather((ref_err - err).detach()))
    kw = {"beta": m.loss_kw["beta"]}
    out = kto_images_loss(err, ref_err, batch["desirable"], weight=weight, reference_point=z0, **kw)
    return StepOutput(out, t, weight)


def preference_step(m: TrainModels, batch: dict, gen: torch.Generator) -> StepOutput:
    """Latents and conditions -> shared (t, eps) -> reference and policy errors -> the objective."""
    if "pixel" in batch:  # independent images (Diffusion-KTO's per-image data)
        return image_step(m, batch, gen)
    lc, ts, fam, proc = m.loss_cfg, m.timestep_cfg, m.comps.family, m.process
    latents, cond = encode_batch(m.comps, batch, gen, m.sample_posterior)
    n = latents.shape[0]
    b, per_image = n // 2, lc.objective == "kto"
    draws = n if per_image else b
    t = sample_timesteps(
        draws, proc.num_steps, sampling=ts.sampling, bins=ts.bins, gamma=ts.gamma,
        mean=ts.mean, std=ts.std, generator=gen, device=latents.device,
    )  # fmt: skip
    eps = torch.randn(latents[:draws].shape, device=latents.device, generator=gen)
    if not per_image:
        t, eps = t.repeat(2), eps.repeat(2, *([1] * (eps.ndim - 1)))
    noisy, target = proc.noise(latents, eps, t)
    model_t = proc.model_timestep(t)

    def errors(pred: Tensor) -> Tensor:
        return space_error(m, pred, noisy, t, eps, target)

    ref_err = None
    if NEEDS_REFERENCE[lc.objective]:
        with m.frozen(), m.autocast():
            ref_err = errors(m.reference.predict(noisy, model_t, cond))
        ref_err = ref_err.clone()  # leave inference mode: a normal tensor for autograd
    err = errors(fam.predict(m.policy, noisy, model_t, cond))
    if ref_err is None:
        ref_err = err.detach()  # delta = 0: the logged rewards of a reference-free objective are 0

    weight = step_weight(m, t if per_image else t[:b])
    extra: dict[str, Any] = {"weight": weight}
    if per_image:
        extra["reference_point"] = m.kto_point.update(m.gather((ref_err - err).detach()))
    elif "label_w" in batch and lc.objective == "pair":
        label = batch["label_w"]  # soft labels (ties kept); all ones is label=None (on the CPU: no sync)
        if lc.outer not in UNIT_LABEL_EXACT or not bool((label == 1).all()):
            extra["label"] = label.to(err.device)
    out = objective_loss(lc.objective, err[:b], err[b:], ref_err[:b], ref_err[b:], **m.loss_kw, **extra)
    return StepOutput(out, t[:b], None if weight is None else weight[:b])


def divergence_estimate(
    m: TrainModels,
    candidate: Callable[[Tensor, Tensor, dict], Tensor],
    initial: Callable[[Tensor, Tensor, dict], Tensor],
    latents: Tensor,
    cond: dict[str, Tensor],
    gen: torch.Generator,
    *,
    estimator: str = "pred_mse",
) -> Tensor:
    """Per-sample divergence of the candidate from the initial model on `latents`, fresh uniform t and eps.

    pred_mse:  mean_{C,H,W} (pred_candidate - pred_initial)^2 — the forward-process approximation of
               KL(p_candidate || p_initial) (Kang et al. 2025, Eq. 7-8; the Gaussian reverse steps share
               their variance, so their KL is proportional to the squared difference of predictions).
    error_gap: e_candidate - e_initial — the difference of denoising errors (can be negative).
    """
    proc, lc = m.process, m.loss_cfg
    k = latents.shape[0]
    t = torch.randint(0, proc.num_steps, (k,), device=latents.device, generator=gen)
    eps = torch.randn(latents.shape, device=latents.device, generator=gen)
    noisy, target = proc.noise(latents, eps, t)
    model_t = proc.model_timestep(t)
    with m.frozen(), m.autocast():
        p_c, p_i = candidate(noisy, model_t, cond), initial(noisy, model_t, cond)
        if lc.error_space == "epsilon":
            p_c, p_i, target = proc.to_epsilon(p_c, noisy, t), proc.to_epsilon(p_i, noisy, t), eps
        if estimator == "pred_mse":
            d = per_sample_error(p_c, p_i, lc.error_reduction)
        else:
            d = per_sample_error(p_c, target, lc.error_reduction) - per_sample_error(
                p_i, target, lc.error_reduction
            )
    return d.clone()


def make_optimizer(train_cfg: Any, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW (torch, foreach), 8-bit AdamW (bitsandbytes: its two moments in 8 bits with block-wise
    scales, Dettmers et al. 2022) or Adafactor (transformers, fixed lr as Diffusion-DPO's SDXL runs)."""
    t = train_cfg
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise XdpoError(
                "train.optimizer=adamw8bit needs bitsandbytes: pip install 'xdpo[bnb]' (or bitsandbytes)"
            ) from None
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon
        )
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
