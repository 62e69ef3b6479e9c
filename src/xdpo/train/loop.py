"""The training recipe: preference fine-tuning of a Stable Diffusion UNet, top to bottom.

One optimizer step (DESIGN.md §2), per micro-batch of B pairs:
  latents z_w, z_l (VAE)  ->  t ~ timestep sampler, one t and one eps per pair, shared by w and l
  ->  reference UNet on [w; l] (inference mode)  ->  policy UNet on [w; l] in one call
  ->  per-sample errors e  ->  objective with lambda(t) (float32)  ->  backward
then clip, step, schedule, maybe update the reference, log one line of metrics.jsonl, checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xdpo.config import Config, dump_yaml
from xdpo.errors import XdpoError
from xdpo.models.load import DTYPES, add_lora, check_pipeline, load_components
from xdpo.objectives import objective_loss
from xdpo.objectives.timesteps import sample_timesteps, snr_lambda_table, timestep_weights
from xdpo.train.batches import StepBatches, mix_seed
from xdpo.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    register_model_hooks,
    resolve_resume,
    save_checkpoint,
    save_final,
    set_aside_newer,
)
from xdpo.train.metrics import MetricsLog, summarize
from xdpo.train.reference import Reference, eval_mode
from xdpo.train.step import (
    denoising_errors,
    divergence_estimate,
    encode_batch,
    make_optimizer,
)

LOSS_KEYS = ("beta", "eta", "gamma", "n", "alpha", "label_smoothing", "logratio_scale", "clamp")


def train(cfg: Config, accelerator=None) -> Path:  # noqa: C901 - the recipe reads top to bottom on purpose
    """Run (or resume) a training run; return `output_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table

    out = Path(cfg.output_dir)
    t, lc, ts = cfg.train, cfg.loss, cfg.timesteps
    accelerator = accelerator or Accelerator(
        # several processes without GPUs (torchrun on CPU): DDP over gloo
        cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        raise XdpoError(
            f"{accelerator.distributed_type.name} is not supported yet (sharded parameters need its own reference "
            "and checkpoint handling); run `accelerate config` with multi-GPU DDP instead"
        )
    resume = resolve_resume(out, t.resume_from)
    if t.resume_from == "latest" and resume is None:
        accelerator.print(f"No checkpoint in {out / 'checkpoints'}: starting fresh")
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
    ref_dtype = weight_dtype if cfg.model.reference_dtype == "auto" else DTYPES[cfg.model.reference_dtype]
    reference = Reference(cfg.reference, unet, lora=lora, dtype=ref_dtype, device=device)
    if not lora:
        unet.requires_grad_(True)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    sched = comps.noise_scheduler
    if ts.sampling == "skewed" and ts.bins > sched.config.num_train_timesteps:
        raise XdpoError(f"timesteps.bins: {ts.bins} bins for {sched.config.num_train_timesteps} timesteps")
    lam_table = snr_lambda_table(sched.alphas_cumprod) if ts.weighting == "snr" else None

    lr = t.learning_rate * (t.batch_size * t.grad_accum * world if t.scale_lr else 1)
    optimizer = make_optimizer(t, params, lr)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps)
    register_model_hooks(accelerator, lora)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    base = accelerator.unwrap_model(unet)  # for reference passes: no DDP hooks

    setup = {
        "world": world,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "lora_rank": cfg.model.lora_rank,
    }
    start_step, state = 0, {"pairs_seen": 0, "setup": setup}
    if resume is not None:
        saved = json.loads((resume / "trainer_state.json").read_text()).get("setup", setup)
        if saved["lora_rank"] != setup["lora_rank"]:
            raise XdpoError(
                f"train.resume_from: {resume} was trained with model.lora_rank={saved['lora_rank']}, "
                f"not {setup['lora_rank']}"
            )
        if saved != setup:
            accelerator.print(f"Warning: resuming with {setup} instead of {saved}: the data order changes")
        state, ref_tensors = load_checkpoint(accelerator, resume)
        start_step = state.pop("step")
        state["setup"] = setup
        if "reference" in state:
            reference.load(state["reference"], ref_tensors)
        accelerator.print(f"Resuming from {resume} at step {start_step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for moved in set_aside_newer(out, start_step) if resume is not None else []:
            accelerator.print(f"Set aside {moved} (newer than the checkpoint resumed from)")
        if resume is not None and (out / "config.yaml").is_file():
            (out / "config.yaml").replace(out / f"config.before-resume-{start_step}.yaml")
        dump_yaml(cfg, out / "config.yaml")
        if t.report_to != "none":
            accelerator.init_trackers("xdpo")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step, enabled=main)
    accelerator.print(
        f"{n_pairs} pairs from {cfg.data.path} ({pairs.n_ties} ties, {pairs.n_dropped} dropped); "
        f"{'LoRA r=' + str(cfg.model.lora_rank) if lora else 'full fine-tune'}, "
        f"{sum(p.numel() for p in params):,} trainable; effective batch {t.batch_size * t.grad_accum * world} "
        f"pairs, lr {lr:.3g}; {lc.objective}/{lc.divergence}/{lc.outer} beta={lc.beta:g}; "
        f"reference {cfg.reference.strategy}; timesteps {ts.sampling}/{ts.weighting}"
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
    loss_kw = {k: getattr(lc, k) for k in LOSS_KEYS}
    if lc.objective == "pair":
        loss_kw.update(divergence=lc.divergence, outer=lc.outer)

    def ref_forward(noisy, tt, cond):
        return reference.forward(base, noisy, tt, cond)

    def ref_initial(noisy, tt, cond):
        return reference.initial_forward(base, noisy, tt, cond)

    def policy_forward(noisy, tt, cond):
        with eval_mode(base):  # the divergence check: no dropout
            return base(noisy, tt, encoder_hidden_states=cond).sample

    # Ctrl-C (one process): finish the step, save a checkpoint, then stop; a second Ctrl-C stops at once
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nxdpo train: stopping after this step (Ctrl-C again to stop now)", flush=True)

    graceful = world == 1 and threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if graceful else None

    step, last_saved, in_update = start_step, start_step, False
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not main, desc="train", dynamic_ncols=True)
    try:
        while step < t.max_steps:
            t0, records, finite = time.perf_counter(), [], []
            for micro in range(t.grad_accum):
                batch = next(batches)
                gen = torch.Generator(device).manual_seed(mix_seed(cfg.seed, step, micro, rank))
                b = len(batch["captions"])
                latents, cond = encode_batch(comps, batch, gen)
                timesteps = sample_timesteps(
                    b,
                    sched.config.num_train_timesteps,
                    sampling=ts.sampling,
                    bins=ts.bins,
                    gamma=ts.gamma,
                    generator=gen,
                    device=device,
                )
                weight = timestep_weights(timesteps, ts.weighting, lam_table)
                with accelerator.no_sync(unet) if micro < t.grad_accum - 1 else nullcontext():
                    err, ref_err = denoising_errors(
                        comps,
                        unet,
                        ref_forward,
                        latents,
                        cond,
                        timesteps,
                        gen,
                        reduction=lc.error_reduction,
                        autocast=accelerator.autocast,
                    )
                    extra = {"weight": weight}
                    if lc.objective == "kto":  # reference point: mean implicit reward over the global batch
                        extra["reference_point"] = accelerator.gather((ref_err - err).detach()).mean()
                    rec = objective_loss(
                        lc.objective, err[:b], err[b:], ref_err[:b], ref_err[b:], **loss_kw, **extra
                    )
                    loss = rec.loss.mean()
                    accelerator.backward(loss / t.grad_accum)
                finite.append(torch.isfinite(loss.detach()))
                records.append((rec, timesteps, weight))
            # one check per step, on every process alike (a rank raising alone would hang the others)
            if not bool(accelerator.gather(torch.stack(finite)).all()):
                optimizer.zero_grad(set_to_none=True)
                raise XdpoError(
                    f"non-finite loss at step {step + 1} (weights not updated; checkpoints intact): lower "
                    "train.learning_rate or loss.beta, or use bf16 / mixed_precision=no if fp16 overflows"
                )

            in_update = True  # from here until the bookkeeping is done, the state is between two steps
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
            lr_now = lr_scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            k = min(cfg.reference.divergence_samples, b)  # the last micro-batch's preferred images
            # fresh (t, eps) for the divergence check, a random stream apart from the steps'
            div_gen = torch.Generator(device).manual_seed(mix_seed(cfg.seed, step, 1 << 30, rank))
            divergence = reference.maybe_update(
                step,
                base,
                partial(
                    divergence_estimate,
                    comps,
                    policy_forward,
                    ref_initial,
                    latents[:k],
                    cond[:k],
                    div_gen,
                    estimator=cfg.reference.divergence,
                    reduction=lc.error_reduction,
                    autocast=accelerator.autocast,
                ),
                lambda x: accelerator.reduce(x, "mean"),
            )
            state["pairs_seen"] = step * t.batch_size * t.grad_accum * world
            state["reference"] = reference.state()
            row = {"step": step, **summarize(accelerator, records)}
            row.update(
                lr=lr_now,
                grad_norm=None if grad_norm is None else float(grad_norm),
                pairs_seen=state["pairs_seen"],
                step_time=time.perf_counter() - t0,
                **reference.metrics(divergence),
            )
            if accelerator.optimizer_step_was_skipped:  # fp16 grad scaler found inf/nan gradients
                row["skipped"] = True
            log.write(row)
            in_update = False

            if main and t.report_to != "none":
                accelerator.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}", refresh=False)
            if (t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps) or stop[
                "requested"
            ]:
                save_checkpoint(accelerator, out, step, state, t.checkpoints_keep, reference.tensors())
                last_saved = step
            if stop["requested"]:
                print(f"xdpo train: stopped at step {step}; resume with train.resume_from=latest", flush=True)
                raise KeyboardInterrupt
    except BaseException:
        # keep what was trained: between steps the weights, optimizer and reference agree with `step`
        if world == 1 and step > last_saved and not in_update:
            path = save_checkpoint(accelerator, out, step, state, t.checkpoints_keep, reference.tensors())
            print(f"xdpo train: interrupted; saved {path} (resume with train.resume_from=latest)", flush=True)
        raise
    finally:
        if graceful:
            signal.signal(signal.SIGINT, previous_handler or signal.SIG_DFL)
        bar.close()
        log.close()

    save_checkpoint(accelerator, out, step, state, t.checkpoints_keep, reference.tensors())
    save_final(accelerator, unet, cfg, out / "final", step)
    accelerator.wait_for_everyone()
    if t.report_to != "none":
        accelerator.end_training()
    if main:
        (out / "final" / "train_summary.json").write_text(json.dumps({"steps": step, **state}, indent=2))
    accelerator.print(
        f"Done: {step} steps; final model in {out / 'final'}; metrics in {out / 'metrics.jsonl'}"
    )
    return out
