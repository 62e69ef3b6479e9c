"""The training recipe: preference fine-tuning of a Stable Diffusion UNet, top to bottom.

One optimizer step (DESIGN.md §2), per micro-batch of B pairs:
  latents z_w, z_l (VAE)  ->  one t and one eps per pair, shared by w and l
  ->  policy UNet on [w; l] in one call  ->  reference UNet on [w; l] (inference mode)
  ->  per-sample errors e = mean_{C,H,W}(pred - target)^2  ->  objective (float32)  ->  backward
then clip, step, schedule, log one line of metrics.jsonl, and checkpoint every N steps.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xdpo.config import Config, dump_yaml
from xdpo.errors import XdpoError
from xdpo.models.load import (
    DTYPES,
    adapters_disabled,
    add_lora,
    check_pipeline,
    encode_images,
    encode_prompts,
    frozen_copy,
    load_components,
    prediction_target,
)
from xdpo.objectives import objective_loss
from xdpo.train.batches import StepBatches, mix_seed
from xdpo.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    register_model_hooks,
    resolve_resume,
    save_checkpoint,
    save_final,
)
from xdpo.train.metrics import MetricsLog, summarize


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """e = mean (or sum) over all non-batch dims of (pred - target)^2, in float32."""
    sq = (pred.float() - target.float()).pow(2)
    dims = list(range(1, sq.ndim))
    return sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)


def denoising_errors(
    comps,
    unet,
    reference,
    batch: dict,
    gen: torch.Generator,
    *,
    lora: bool,
    reduction: str,
    autocast=nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy and reference errors on [w; l] (shape [2B] each) and the B timesteps.

    One timestep and one noise per pair, shared by the preferred and dispreferred image; one batched
    policy call; the reference (a frozen copy, or with LoRA the same UNet with adapters disabled)
    runs in inference mode.
    """
    device, sched = gen.device, comps.noise_scheduler
    b = len(batch["captions"])
    pixels = torch.cat([batch["pixel_w"], batch["pixel_l"]]).to(device)
    latents = encode_images(comps.vae, pixels, gen).float()
    cond = encode_prompts(comps.tokenizer, comps.text_encoder, batch["captions"], device).repeat(2, 1, 1)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device, generator=gen)
    noise = torch.randn(latents[:b].shape, device=device, generator=gen)
    t2, noise = timesteps.repeat(2), noise.repeat(2, 1, 1, 1)
    noisy = sched.add_noise(latents, noise, t2)
    target = prediction_target(sched, latents, noise, t2)

    err = per_sample_error(unet(noisy, t2, encoder_hidden_states=cond).sample, target, reduction)
    with torch.inference_mode(), autocast():
        with adapters_disabled(reference) if lora else nullcontext():
            ref_pred = reference(noisy, t2, encoder_hidden_states=cond).sample
        ref_err = per_sample_error(ref_pred, target, reduction)
    return err, ref_err.clone(), timesteps  # clone: leave inference mode, a normal tensor for autograd


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    t = cfg.train
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


def train(cfg: Config, accelerator=None) -> Path:  # noqa: C901 - the recipe reads top to bottom on purpose
    """Run (or resume) a training run; return `output_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table

    out = Path(cfg.output_dir)
    t, lc = cfg.train, cfg.loss
    accelerator = accelerator or Accelerator(
        # several processes without GPUs (torchrun on CPU): DDP over gloo
        cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    resume = resolve_resume(out, t.resume_from)
    if resume is None and t.resume_from not in ("", "latest"):
        raise XdpoError(f"train.resume_from: nothing to resume in {t.resume_from}")
    if resume is None and list_checkpoints(out):
        raise XdpoError(
            f"{out} already has checkpoints; set train.resume_from=latest to continue, or choose a new output_dir"
        )

    check_pipeline(cfg.model.pretrained)  # fail fast, before reading a large dataset

    # ---- data ------------------------------------------------------------------------------
    table = load_preference_table(cfg.data.path, cfg.data.split)
    pairs = PreferencePairs(
        table,
        resolution=cfg.data.resolution,
        ties=cfg.data.ties,
        flip=cfg.data.flip,
        random_crop=cfg.data.random_crop,
        prompt_dropout=cfg.data.prompt_dropout,
        source=cfg.data.path,
    )
    n_pairs = min(len(pairs), cfg.data.max_pairs) if cfg.data.max_pairs else len(pairs)
    if n_pairs == 0:
        raise XdpoError(f"data.path: {cfg.data.path} has no usable pairs ({pairs.n_ties} ties dropped)")

    # ---- models ----------------------------------------------------------------------------
    set_seed(cfg.seed)  # LoRA initialisation and anything else drawing from the global RNGs
    comps = load_components(cfg.model)
    weight_dtype = DTYPES[t.mixed_precision]
    for frozen in (comps.vae, comps.text_encoder):  # frozen encoders run in the mixed-precision dtype
        frozen.to(device) if weight_dtype == torch.float32 else frozen.to(device, dtype=weight_dtype)
    unet, lora = comps.unet, cfg.model.lora_rank > 0
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if lora:
        unet.to(device) if weight_dtype == torch.float32 else unet.to(device, dtype=weight_dtype)
        add_lora(unet, cfg.model)
        reference = None  # the same UNet with adapters disabled (see denoising_errors)
    else:
        ref_dtype = weight_dtype if cfg.model.reference_dtype == "auto" else DTYPES[cfg.model.reference_dtype]
        reference = frozen_copy(unet, ref_dtype, device)
        unet.requires_grad_(True)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]

    lr = t.learning_rate * (t.batch_size * t.grad_accum * world if t.scale_lr else 1)
    optimizer = make_optimizer(cfg, params, lr)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps)
    register_model_hooks(accelerator, lora)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)

    start_step, state = 0, {"pairs_seen": 0}
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        start_step = state["step"]
        accelerator.print(f"Resuming from {resume} at step {start_step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
        if t.report_to != "none":
            accelerator.init_trackers("xdpo")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step, enabled=main)
    n_trainable = sum(p.numel() for p in params)
    accelerator.print(
        f"{n_pairs} pairs from {cfg.data.path} ({pairs.n_ties} ties, {pairs.n_dropped} dropped); "
        f"{'LoRA r=' + str(cfg.model.lora_rank) if lora else 'full fine-tune'}, {n_trainable:,} trainable; "
        f"effective batch {t.batch_size * t.grad_accum * world} pairs, lr {lr:.3g}; "
        f"{cfg.loss.objective}/{cfg.loss.divergence}/{cfg.loss.outer} beta={cfg.loss.beta:g}"
    )

    loader = torch.utils.data.DataLoader(
        pairs,
        batch_sampler=StepBatches(
            n_pairs,
            seed=cfg.seed,
            start_step=start_step,
            max_steps=t.max_steps,
            grad_accum=t.grad_accum,
            rank=rank,
            world=world,
            batch_size=t.batch_size,
        ),
        collate_fn=collate_pairs,
        num_workers=cfg.data.num_workers,
    )
    batches = iter(loader)
    ref_unet = accelerator.unwrap_model(unet) if lora else reference
    loss_kw = {
        k: getattr(lc, k)
        for k in ("beta", "eta", "gamma", "n", "alpha", "label_smoothing", "logratio_scale", "clamp")
    }
    if lc.objective == "pair":
        loss_kw.update(divergence=lc.divergence, outer=lc.outer)

    step, last_saved = start_step, start_step
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not main, desc="train", dynamic_ncols=True)
    try:
        while step < t.max_steps:
            t0, records = time.perf_counter(), []
            for micro in range(t.grad_accum):
                batch = next(batches)
                gen = torch.Generator(device).manual_seed(mix_seed(cfg.seed, step, micro, rank))
                b = len(batch["captions"])
                sync = micro == t.grad_accum - 1
                with accelerator.no_sync(unet) if not sync else nullcontext():
                    err, ref_err, timesteps = denoising_errors(
                        comps,
                        unet,
                        ref_unet,
                        batch,
                        gen,
                        lora=lora,
                        reduction=lc.error_reduction,
                        autocast=accelerator.autocast,
                    )
                    rec = objective_loss(lc.objective, err[:b], err[b:], ref_err[:b], ref_err[b:], **loss_kw)
                    loss = rec.loss.mean()
                    if not torch.isfinite(loss):
                        raise XdpoError(
                            f"non-finite loss at step {step + 1}; lower train.learning_rate or loss.beta "
                            f"(checkpoints so far are intact)"
                        )
                    accelerator.backward(loss / t.grad_accum)
                records.append((rec, timesteps))

            grad_norm = None
            if t.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            state["pairs_seen"] = step * t.batch_size * t.grad_accum * world
            row = summarize(accelerator, records)
            row.update(
                step=step,
                lr=lr_scheduler.get_last_lr()[0],
                grad_norm=None if grad_norm is None else float(grad_norm),
                pairs_seen=state["pairs_seen"],
                step_time=time.perf_counter() - t0,
            )
            log.write(row)
            if main and t.report_to != "none":
                accelerator.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}", refresh=False)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                save_checkpoint(accelerator, out, step, state, t.checkpoints_keep)
                last_saved = step
    except BaseException:
        # keep what was trained: the weights after the last completed step are consistent
        if world == 1 and step > last_saved:
            path = save_checkpoint(accelerator, out, step, state, t.checkpoints_keep)
            print(f"xdpo train: interrupted; saved {path} (resume with train.resume_from=latest)")
        raise
    finally:
        bar.close()
        log.close()

    save_checkpoint(accelerator, out, step, state, t.checkpoints_keep)
    save_final(accelerator, unet, cfg, out / "final", step)
    accelerator.wait_for_everyone()
    if t.report_to != "none":
        accelerator.end_training()
    accelerator.print(
        f"Done: {step} steps; final model in {out / 'final'}; metrics in {out / 'metrics.jsonl'}"
    )
    if main:
        (out / "final" / "train_summary.json").write_text(json.dumps({"steps": step, **state}, indent=2))
    return out
