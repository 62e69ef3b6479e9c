"""Setting up a run: the family's pipeline, LoRA, the noise process, the reference (only when the objective
needs one), the models prepared by accelerate, the step context that ties them to the objective, the
reference's probe set and the run's summary line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xdpo.config import Config
from xdpo.data.buckets import check_multiple, parse_buckets
from xdpo.data.encode import encode
from xdpo.errors import XdpoError
from xdpo.models.load import (
    DTYPES,
    Components,
    add_lora,
    add_text_lora,
    check_data_shape,
    half_precision,
    load_components,
    vae_scale_factor,
)
from xdpo.models.noise import PROCESSES
from xdpo.models.quantize import quantize_model
from xdpo.objectives import Objective
from xdpo.objectives.timesteps import minmax_lambda_table, weight_tables
from xdpo.train.batches import mix_seed
from xdpo.train.checkpoint import register_model_hooks
from xdpo.train.distributed import deepspeed_stage, is_partitioned, local_fraction
from xdpo.train.memory import estimate, format_estimate, sharding_of
from xdpo.train.optim import learning_rate, make_optimizer, make_scheduler, text_encoder_lr
from xdpo.train.reference import Probe, Reference
from xdpo.train.step import StepContext


@dataclass
class Models:
    comps: Components
    process: Any
    policy: Any  # the trained denoiser (with LoRA adapters when model.lora_rank > 0), unwrapped
    reference: Reference | None  # None when the objective runs no reference
    params: list[torch.nn.Parameter]  # the trainable ones
    text_params: list[torch.nn.Parameter] = field(default_factory=list)  # the text encoders' LoRA weights


def resolve_timesteps(cfg: Config, process_kind: str) -> None:
    """`timesteps.sampling=auto` -> uniform (DDPM families, Diffusion-DPO) or logit_normal (flow, SD3)."""
    if cfg.timesteps.sampling == "auto":  # dense is an importance weight over uniform t (train/rules.py)
        flow = process_kind == "flow" and cfg.timesteps.weighting != "dense"
        cfg.timesteps.sampling = "logit_normal" if flow else "uniform"
    if cfg.loss.beta_schedule == "flow" and process_kind != "flow":
        raise XdpoError(
            "loss.beta_schedule: `flow` (beta (1 - sigma)^2, Flow-DPO) applies to flow-matching models "
            "(SD3, Flux); this model is a DDPM model"
        )


def make_process(cfg: Config, comps: Components) -> Any:
    """The family's noise process; a dynamic shift uses the training resolution's token count (and the
    family's mu where its pipeline computes its own: FLUX.2)."""
    fam, kind = comps.family, comps.family.process
    if kind == "ddpm":
        return PROCESSES[kind](comps.scheduler)
    side = cfg.data.resolution // vae_scale_factor(comps.vae)
    tokens = fam.image_tokens(side, side)
    dynamic = comps.scheduler.config.get("use_dynamic_shifting", False)
    mu = fam.shift_mu(tokens, comps.scheduler.config, cfg.family) if dynamic and fam.shift_mu else None
    return PROCESSES[kind](comps.scheduler, image_seq_len=tokens, mu=mu)


def place_frozen(
    comps: Components, mixed_precision: str, device: torch.device, quantize: str = "none"
) -> None:
    """The VAE and text encoders on `device` in the mixed-precision dtype (what they encode in); the text
    encoders were loaded in it (`load_components(text_dtype=...)`, keeping T5's fp32 layers), their Linear
    weights quantised when `quantize` (model.quantize_text_encoders) says so."""
    weight_dtype = DTYPES[mixed_precision]
    # SDXL's VAE overflows in fp16 (unless it is the fp16-fix VAE, whose config says force_upcast: false)
    upcast = weight_dtype == torch.float16 and getattr(comps.vae.config, "force_upcast", False)
    comps.vae.to(device, dtype=torch.float32 if upcast else weight_dtype)
    for frozen in comps.text_encoders.values():
        if quantize == "none":
            frozen.to(device)
        else:
            quantize_model(frozen, quantize, device, frozen.dtype, key="model.quantize_text_encoders")


def load_models(cfg: Config, device: torch.device, objective: Objective) -> Models:
    """Everything on `device`. With `data.cache` the text encoders and tokenizers are not loaded and the
    VAE stays on the CPU, never called (its config scales the latents)."""
    if cfg.data.cache:
        from xdpo.data.cache import text_components

        comps = load_components(cfg.model, cfg.family, skip=text_components(cfg))
    else:
        comps = load_components(cfg.model, cfg.family, text_dtype=half_precision(cfg.train.mixed_precision))
        place_frozen(comps, cfg.train.mixed_precision, device, cfg.model.quantize_text_encoders)
    check_data_shape(comps.family, cfg.data, comps.vae)
    if cfg.data.buckets:
        buckets = parse_buckets(cfg.data.buckets, cfg.data.resolution, cfg.data.bucket_step)
        check_multiple(buckets, vae_scale_factor(comps.vae) * comps.family.latent_patch, comps.family.name)
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    process = make_process(cfg, comps)
    resolve_timesteps(cfg, process.kind)
    ts = cfg.timesteps
    if ts.sampling == "skewed" and ts.bins > process.num_steps:
        raise XdpoError(f"timesteps.bins: {ts.bins} bins for {process.num_steps} timesteps")
    model, lora = comps.denoiser, cfg.model.lora_rank > 0
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if lora:
        quantize_model(model, cfg.model.quantize, device, weight_dtype)  # `none`: moved and cast only
        add_lora(model, cfg.model)
    reference = None
    if objective.needs_reference:
        ref_dtype = weight_dtype if cfg.model.reference_dtype == "auto" else DTYPES[cfg.model.reference_dtype]
        reference = Reference(cfg.reference, comps.family, model, lora=lora, dtype=ref_dtype, device=device)
        reference.bind(cfg)
    if not lora:
        model.to(device)
        model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    text_params = []
    if cfg.model.lora_text_encoder:  # LoRA on the family's text encoders, beside the denoiser's
        comps.text_lora = add_text_lora(comps.family, comps.text_encoders, cfg.model)
        text_params = [p for enc in comps.text_lora.values() for p in enc.parameters() if p.requires_grad]
    return Models(comps, process, model, reference, params, text_params)


def lambda_table(cfg: Config, process: Any) -> torch.Tensor | None:
    """Kang et al.'s lambda(t) as the paper defines it (before `timesteps.normalize`), or None."""
    return minmax_lambda_table(process.weighting_basis()) if cfg.timesteps.weighting == "snr" else None


def objective_params(cfg: Config, objective: Objective) -> dict[str, Any]:
    """The objective's keyword arguments: the `loss.*` keys it reads, and its own section's options."""
    params = {k: getattr(cfg.loss, k) for k in objective.params}
    if objective.options:
        section = getattr(cfg, objective.name)
        params |= {o.name: getattr(section, o.name) for o in objective.options}
    return params


def step_context(cfg: Config, models: Models, objective: Objective, **run: Any) -> StepContext:
    """The step's view of the run; `run` holds the accelerator-side parts (policy as prepared, autocast,
    gather, rank, frozen, the objective's state)."""
    lc, tables = cfg.loss, weight_tables(cfg.timesteps, models.process)
    return StepContext(
        comps=models.comps,
        process=models.process,
        policy=run.pop("policy", models.policy),
        reference=models.reference,
        objective=objective,
        params=objective_params(cfg, objective),
        timesteps=cfg.timesteps,
        error_space=lc.error_space,
        error_reduction=lc.error_reduction,
        beta_schedule=lc.beta_schedule,
        lambda_table=tables.lam,
        loss_weight_table=tables.loss,
        sample_posterior=cfg.data.sample_posterior,
        noise_offset=cfg.train.noise_offset,
        **run,
    )


def single_process(cfg: Config, device: torch.device | str = "cpu") -> tuple[StepContext, Models]:
    """A step context and the models of `cfg` on one process without accelerate (tests, benchmarks);
    `timesteps.sampling=auto` is resolved, the objective's state made for one micro-batch per step."""
    from xdpo.objectives import get_objective

    objective = get_objective(cfg.loss.objective)
    models = load_models(cfg, torch.device(device), objective)
    images = (2 if cfg.data.format == "pairs" else 1) * cfg.train.batch_size * cfg.train.grad_accum
    state = objective.state(images) if objective.state else None
    return step_context(cfg, models, objective, state=state), models


PROBE_SALT = 0x9E0BE


def prepare_models(cfg: Config, acc: Any, objective: Objective) -> tuple[Models, Any, Any, Any]:
    """(models, the policy and optimizer as accelerate prepared them, the lr schedule). Prints the memory
    estimate and, under FSDP2 / ZeRO-3, how many parameters this process holds."""
    t = cfg.train
    if cfg.model.lora_text_encoder and acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise XdpoError(
            f"model.lora_text_encoder: not under {acc.distributed_type.name}, which wraps the denoiser only (the "
            "text encoders' LoRA would stay outside it); use DDP (no FSDP / DeepSpeed config) or one process"
        )
    models = load_models(cfg, acc.device, objective)
    comps, denoiser = models.comps, models.comps.family.denoiser
    parts = {denoiser: models.policy, **({} if cfg.data.cache else {"vae": comps.vae}), **comps.text_encoders}
    acc.print(format_estimate(estimate(parts, denoiser, cfg, sharding_of(acc))))
    # the text encoders' LoRA: a param group of its own, at model.lora_text_encoder_lr
    text = ((models.text_params, text_encoder_lr(cfg, acc.num_processes)),) if models.text_params else ()
    optimizer = make_optimizer(t, models.params, learning_rate(t, acc.num_processes), text)
    scheduler = make_scheduler(t, optimizer)  # on the torch optimizer, before accelerate wraps it
    if acc.distributed_type.name not in ("FSDP", "DEEPSPEED"):  # those save their shards themselves
        register_model_hooks(acc, cfg.model.lora_rank > 0, denoiser)
    policy, optimizer = acc.prepare(models.policy, optimizer)
    sharded = is_partitioned(acc)  # FSDP2 or ZeRO-3
    if models.reference is not None:
        models.reference.set_sharded(sharded)
    if sharded:
        held, total = local_fraction(policy)
        mode = "FSDP" if deepspeed_stage(acc) is None else "ZeRO-3"
        print(f"{mode}: process {acc.process_index} holds {held:,} of {total:,} parameters ({held / total:.2f})",
              flush=True)  # fmt: skip
    return models, policy, optimizer, scheduler


@torch.no_grad()
def make_probe(cfg: Config, data: Any, ctx: Any, rank: int, world: int) -> Probe:
    """The moving reference's probe set: `probe_size` preferred images drawn once from `data` (seeded,
    apart from the training order), as many on every process (a sharded model's forwards are collectives),
    this process's share encoded by the step's own path. Data that are not pairs or images name their own
    preferred images (`probe_images()`, `probe_batch(images)`: an online round's clean samples above their
    group's mean score, not the recorded sampler steps a likelihood objective trains on)."""
    pool = data.probe_images() if hasattr(data, "probe_images") else range(len(data))
    size = min(cfg.reference.probe_size, len(pool))
    order = np.random.default_rng([cfg.seed, PROBE_SALT]).permutation(len(pool))[:size]
    per = -(-size // world)
    mine = [int(pool[int(order[(rank + world * j) % size])]) for j in range(per)]
    if hasattr(data, "probe_batch"):
        batch = data.probe_batch(mine)
    else:
        batch = data.collate([data[(i, mix_seed(cfg.seed, PROBE_SALT, i))] for i in mine])
    device = next(ctx.policy.parameters()).device if cfg.data.cache else ctx.comps.vae.device
    gen = torch.Generator(device).manual_seed(mix_seed(cfg.seed, PROBE_SALT, rank))
    enc = encode(ctx.comps, batch, gen, ctx.sample_posterior).first(len(mine))  # the preferred images
    return Probe(
        enc.latents, enc.cond, ctx.process, error_space=ctx.error_space, error_reduction=ctx.error_reduction,
        autocast=ctx.autocast, frozen=ctx.frozen, gather=ctx.gather, rank=rank,
    )  # fmt: skip


def describe(recipe: Any) -> str:
    """The run's one-line summary: data, model, trainable size, batch and lr, objective, strategies, mode."""
    cfg, acc, fam, obj = recipe.cfg, recipe.acc, recipe.family, recipe.objective
    t, lc, ts = cfg.train, cfg.loss, cfg.timesteps
    world, zero = acc.num_processes, deepspeed_stage(acc)
    lora = cfg.model.lora_rank
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in recipe.params)
    te = text_encoder_lr(cfg, world) if cfg.model.lora_text_encoder else None
    text = "" if te is None else f" (+ text encoders, lr {te:.3g})"
    ref = f"reference {cfg.reference.strategy}" if obj.needs_reference else "no reference"
    weights = weight_tables(ts, recipe.models.process).describe(ts.weighting, ts.sampling)
    # the loss keys this objective takes (Objective.params): a rollout objective has no divergence or beta
    loss = "/".join(
        [lc.objective, *(str(getattr(lc, k)) for k in ("divergence", "outer") if k in obj.params)]
    )
    if "beta" in obj.params:
        loss += f" beta={lc.beta:g} (schedule {lc.beta_schedule})"
    return (
        f"{recipe.data.about}; {fam.name} ({fam.pipeline_class}, {recipe.models.process.kind}); "
        f"{'LoRA r=' + str(lora) if lora else 'full fine-tune'}{text}, {trainable:,} trainable; effective batch "
        f"{t.batch_size * t.grad_accum * world} pairs, lr {recipe.lr:.3g}; {loss}; {ref}; {weights}; errors "
        f"{lc.error_space}/{lc.error_reduction}; distributed: "
        f"{acc.distributed_type.name}{'' if zero is None else f' ZeRO-{zero}'}, {world} process(es)"
    )
