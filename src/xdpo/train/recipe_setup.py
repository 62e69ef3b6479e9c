"""The recipe's set-up parts: models prepared by accelerate, the reference's probe set, the run's summary line."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xdpo.config import Config
from xdpo.data.encode import encode
from xdpo.objectives import Objective
from xdpo.train.batches import mix_seed
from xdpo.train.checkpoint import register_model_hooks
from xdpo.train.distributed import deepspeed_stage, is_partitioned, local_fraction
from xdpo.train.memory import estimate, format_estimate, sharding_of
from xdpo.train.optim import learning_rate, make_optimizer, make_scheduler
from xdpo.train.reference import Probe
from xdpo.train.setup import Models, load_models

PROBE_SALT = 0x9E0BE


def prepare_models(cfg: Config, acc: Any, objective: Objective) -> tuple[Models, Any, Any, Any]:
    """(models, the policy and optimizer as accelerate prepared them, the lr schedule). Prints the memory
    estimate and, under FSDP2 / ZeRO-3, how many parameters this process holds."""
    t = cfg.train
    models = load_models(cfg, acc.device, objective)
    comps, denoiser = models.comps, models.comps.family.denoiser
    parts = {denoiser: models.policy, **({} if cfg.data.cache else {"vae": comps.vae}), **comps.text_encoders}
    acc.print(format_estimate(estimate(parts, denoiser, cfg, sharding_of(acc))))
    optimizer = make_optimizer(t, models.params, learning_rate(t, acc.num_processes))
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
    """The periodic reference's probe set: `probe_size` preferred images drawn once from `data` (seeded,
    apart from the training order), as many on every process (a sharded model's forwards are collectives),
    this process's share encoded by the step's own path."""
    n = len(data)
    size = min(cfg.reference.probe_size, n)
    order = np.random.default_rng([cfg.seed, PROBE_SALT]).permutation(n)[:size]
    per = -(-size // world)
    mine = [int(order[(rank + world * j) % size]) for j in range(per)]
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
    ref = f"reference {cfg.reference.strategy}" if obj.needs_reference else "no reference"
    return (
        f"{recipe.data.about}; {fam.name} ({fam.pipeline_class}, {recipe.models.process.kind}); "
        f"{'LoRA r=' + str(lora) if lora else 'full fine-tune'}, {trainable:,} trainable; effective batch "
        f"{t.batch_size * t.grad_accum * world} pairs, lr {recipe.lr:.3g}; {lc.objective}/{lc.divergence}/"
        f"{lc.outer} beta={lc.beta:g}; {ref}; timesteps {ts.sampling}/{ts.weighting}; errors "
        f"{lc.error_space}/{lc.error_reduction}, beta schedule {lc.beta_schedule}; distributed: "
        f"{acc.distributed_type.name}{'' if zero is None else f' ZeRO-{zero}'}, {world} process(es)"
    )
