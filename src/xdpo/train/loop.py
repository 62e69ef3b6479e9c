"""The training recipe: preference fine-tuning of a diffusion model of any family, top to bottom.

One optimizer step (docs/design.md §2), per micro-batch of B pairs (`step.preference_step`):
  latents z_w, z_l (VAE)  ->  t ~ timestep sampler, one t and one eps per pair, shared by w and l
  ->  reference on [w; l] (inference mode)  ->  policy on [w; l] in one call
  ->  per-sample errors e  ->  objective with lambda(t) (float32)  ->  backward
then clip, step, schedule, maybe update the reference, log one line of metrics.jsonl, checkpoint.
SIGINT and SIGTERM (preemption) finish the step, save a checkpoint on every process, and exit.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xdpo.config import Config, dump_yaml
from xdpo.errors import XdpoError
from xdpo.models.load import check_pipeline
from xdpo.train.batches import StepBatches, mix_seed
from xdpo.train.checkpoint import (
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    register_model_hooks,
    resolve_resume,
    save_checkpoint,
    save_final,
    set_aside_newer,
)
from xdpo.train.distributed import (
    clip_grad_norm,
    deepspeed_stage,
    is_partitioned,
    local_fraction,
    make_accelerator,
    optimizer_step,
    policy_autocast,
)
from xdpo.train.memory import estimate, format_estimate, sharding_of
from xdpo.train.metrics import MetricsLog, summarize
from xdpo.train.setup import build_probe, lambda_table, load_models, loss_kwargs
from xdpo.train.step import KTOReferencePoint, TrainModels, make_optimizer, preference_step

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def train(cfg: Config, accelerator=None) -> Path:  # noqa: C901 - the recipe reads top to bottom on purpose
    """Run (or resume) a training run; return `output_dir`."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from xdpo.data import collate_images, collate_pairs, open_data
    from xdpo.data.cache_reader import collate_cached, open_cache

    out = Path(cfg.output_dir)
    t, lc, ts = cfg.train, cfg.loss, cfg.timesteps
    accelerator = accelerator or make_accelerator(cfg, out)  # DDP, FSDP2, DeepSpeed (both forced on CPU)
    accelerator.gradient_accumulation_steps = t.grad_accum  # also when an accelerator is passed in
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main, sharded = accelerator.is_main_process, is_partitioned(accelerator)  # FSDP2 or ZeRO-3
    zero = deepspeed_stage(accelerator)  # None unless DeepSpeed
    if main:
        for note in clean_partial(out):
            accelerator.print(f"Checkpoints: {note}")
    accelerator.wait_for_everyone()
    resume = resolve_resume(out, t.resume_from)
    if t.resume_from == "latest" and resume is None:
        accelerator.print(f"No checkpoint in {out / 'checkpoints'}: starting fresh")
    if resume is None and list_checkpoints(out):
        raise XdpoError(
            f"{out} already has checkpoints; set train.resume_from=latest to continue, or choose a new output_dir"
        )
    family = check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision)  # fail fast

    # ---- data ------------------------------------------------------------------------------
    if cfg.data.cache:  # posteriors and conditions written by `xdpo cache`, checked against this config
        pairs, collate = open_cache(cfg, family), collate_cached
        n_pairs = len(pairs)
        accelerator.print(f"Latents and text conditions from the cache {cfg.data.cache}")
    elif t.online:  # pairs come round by round from the policy (train/online.py)
        pairs, n_pairs, collate = None, 1, collate_pairs
    else:
        with accelerator.main_process_first():  # tar indexes and streamed subsets are built once
            _, pairs, n_pairs = open_data(cfg)
        collate = collate_images if cfg.data.format == "images" else collate_pairs
    if n_pairs == 0:
        raise XdpoError(f"data.path: {cfg.data.path} has no usable pairs ({pairs.n_ties} ties dropped)")

    # ---- models ----------------------------------------------------------------------------
    set_seed(cfg.seed)  # LoRA initialisation and anything else drawing from the global RNGs
    comps, process, unet, reference, params = load_models(cfg, device)
    lora = cfg.model.lora_rank > 0
    parts = {family.denoiser: unet, **({} if cfg.data.cache else {"vae": comps.vae}), **comps.text_encoders}
    accelerator.print(format_estimate(estimate(parts, family.denoiser, cfg, sharding_of(accelerator))))
    lr = t.learning_rate * (t.batch_size * t.grad_accum * world if t.scale_lr else 1)
    optimizer = make_optimizer(t, params, lr)
    # not prepared: accelerate's scheduler wrapper steps once per process (and skips while accumulating);
    # this one steps exactly once per optimizer step
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=t.warmup_steps)
    if accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED"):  # those save their shards themselves
        register_model_hooks(accelerator, lora, family.denoiser)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    params = [p for p in unet.parameters() if p.requires_grad]  # FSDP2 replaced them by sharded ones
    autocast = policy_autocast(accelerator, unet)  # DeepSpeed: a bf16/fp16 model, fp32 inputs
    reference.sharded = sharded
    if sharded:
        held, total = local_fraction(unet)
        mode = "FSDP" if zero is None else "ZeRO-3"
        print(
            f"{mode}: process {rank} holds {held:,} of {total:,} parameters ({held / total:.2f})", flush=True
        )
    accelerator.register_for_checkpointing(lr_scheduler)
    m = TrainModels(
        comps=comps,
        process=process,
        policy=unet,
        reference=reference,
        loss_cfg=lc,
        timestep_cfg=ts,
        loss_kw=loss_kwargs(cfg),
        lambda_table=lambda_table(cfg, process),
        autocast=autocast,
        gather=accelerator.gather,
        rank=rank,
        frozen=torch.no_grad if sharded else torch.inference_mode,
        kto_point=KTOReferencePoint(  # one optimizer step's images, all processes
            (1 if cfg.data.format == "images" else 2) * t.batch_size * t.grad_accum * world
        ),
        sample_posterior=cfg.data.sample_posterior,
    )

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
        m.kto_point.load(state.get("kto_window", []))
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
    if t.online:
        source = (
            f"online DPO: rounds of {t.online_every} steps, {t.online_per_prompt} images per prompt of "
            f"{t.online_prompts}, scored by {t.online_scorer}; "
        )
    else:
        source = f"{n_pairs} pairs from {cfg.data.path} ({pairs.n_ties} ties, {pairs.n_dropped} dropped); "
    accelerator.print(
        source + f"{family.name} ({family.pipeline_class}, {process.kind}); "
        f"{'LoRA r=' + str(cfg.model.lora_rank) if lora else 'full fine-tune'}, "
        f"{sum(getattr(p, 'ds_numel', p.numel()) for p in params):,} trainable; effective batch {t.batch_size * t.grad_accum * world} "
        f"pairs, lr {lr:.3g}; {lc.objective}/{lc.divergence}/{lc.outer} beta={lc.beta:g}; "
        f"reference {cfg.reference.strategy}; timesteps {ts.sampling}/{ts.weighting}; "
        f"errors {lc.error_space}/{lc.error_reduction}, beta schedule {lc.beta_schedule}; "
        f"distributed: {accelerator.distributed_type.name}{'' if zero is None else f' ZeRO-{zero}'}, "
        f"{world} process(es)"
    )

    def micro_batches(data, seed, start, stop):
        sampler = StepBatches(
            len(data), seed=seed, start_step=start, max_steps=stop, grad_accum=t.grad_accum,
            rank=rank, world=world, batch_size=t.batch_size,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers
        )
        return iter(loader)

    if t.online:
        from xdpo.pairs.scoring import load_reward
        from xdpo.train.online import make_round, round_file, round_pairs, stream

        reward = load_reward(t.online_scorer, device=str(device))

        def new_round(r):
            with autocast():  # the pipeline's VAE and encoders hold the run's dtype, the policy does not
                path = make_round(cfg, comps, accelerator.unwrap_model(unet), reward, out, r, accelerator)
            data = round_pairs(cfg, path)
            accelerator.print(
                f"Online round {r}: {len(data)} pairs from the policy at step {r * t.online_every}"
            )
            return data

        first = start_step // t.online_every
        pairs = new_round(first)
        n_pairs = len(pairs)
        batches = stream(cfg, (first, pairs), new_round, micro_batches, start_step)
    else:
        batches = micro_batches(pairs, cfg.seed, start_step, t.max_steps)
    if cfg.reference.strategy == "periodic":
        if t.online:  # the probe comes from round 0's pairs, also when resuming in a later round
            pairs = round_pairs(cfg, round_file(out, 0))
            n_pairs = len(pairs)
        build_probe(cfg, pairs, n_pairs, m, rank, world, collate)

    # SIGINT / SIGTERM: finish the step, save a checkpoint (all processes agree), then stop;
    # a second SIGINT stops at once
    stop = {"requested": False}

    def on_signal(signum, frame):
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["requested"] = True
        name = signal.Signals(signum).name
        print(f"\nxdpo train: {name}: stopping after this step (Ctrl-C again to stop now)", flush=True)

    graceful = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if graceful else {}

    step, last_saved, in_update = start_step, start_step, False
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not main, desc="train", dynamic_ncols=True)
    skipped_run = state.get("nonfinite_in_a_row", 0)
    try:
        while step < t.max_steps:
            t0, records, finite = time.perf_counter(), [], []
            # accelerate's micro-batch counter, derived from ours (a resume or an interrupted step cannot
            # shift it): accumulate() syncs gradients (DDP all-reduce, FSDP2 reduce-scatter) on the last
            # micro-batch only, and backward() divides the loss by grad_accum
            accelerator.step = step * t.grad_accum
            for micro in range(t.grad_accum):
                batch = next(batches)
                gen = torch.Generator(device).manual_seed(mix_seed(cfg.seed, step, micro, rank))
                with accelerator.accumulate(unet):
                    res = preference_step(m, batch, gen)
                    loss = res.out.loss.mean()
                    accelerator.backward(loss)
                finite.append(torch.isfinite(loss.detach()))
                records.append((res.out, res.timesteps, res.weight))
            # one collective per step, on every process alike: all finite? anyone asked to stop?
            flags = torch.stack([torch.stack(finite).all(), torch.tensor(stop["requested"], device=device)])
            flags = accelerator.gather(flags.float().unsqueeze(0)).view(-1, 2)
            all_finite, stop["requested"] = bool(flags[:, 0].min() > 0), bool(flags[:, 1].max() > 0)
            if zero is not None and not all_finite and not accelerator.optimizer_step_was_skipped:
                # DeepSpeed steps inside backward(); it skips non-finite gradients, not a non-finite loss
                in_update = True  # the weights moved without the step: nothing of this state is saved
                raise XdpoError(
                    f"non-finite loss at step {step + 1} with finite gradients: DeepSpeed applied the update; "
                    "the weights after it are not saved (resume from the last checkpoint with a lower "
                    "train.learning_rate or loss.beta)"
                )
            if not all_finite:
                optimizer.zero_grad(set_to_none=True)  # the weights never see a non-finite gradient
                skipped_run += 1
                if t.nonfinite == "stop" or skipped_run > t.max_nonfinite:
                    raise XdpoError(
                        f"non-finite loss at step {step + 1} ({skipped_run} in a row; weights not updated, "
                        "checkpoints intact): lower train.learning_rate or loss.beta, or use bf16 / "
                        "mixed_precision=no if fp16 overflows"
                        + ("" if t.nonfinite == "stop" else f"; train.max_nonfinite={t.max_nonfinite}")
                    )

            in_update = True  # from here until the bookkeeping is done, the state is between two steps
            grad_norm = None
            lr_now = lr_scheduler.get_last_lr()[0]  # the rate this step uses
            if all_finite:
                skipped_run = 0
                if t.max_grad_norm > 0:
                    grad_norm = clip_grad_norm(accelerator, params, t.max_grad_norm)
                optimizer_step(accelerator, optimizer)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            divergence = reference.maybe_update(step, m, cfg.seed, chunk=max(2 * t.batch_size, 1))
            state["pairs_seen"] = step * t.batch_size * t.grad_accum * world
            state["reference"] = reference.state()
            state["kto_window"] = m.kto_point.state() if lc.objective == "kto" else []
            state["nonfinite_in_a_row"] = skipped_run
            state["nonfinite_total"] = state.get("nonfinite_total", 0) + (0 if all_finite else 1)
            row = {"step": step, **summarize(accelerator, records, keep_deltas=t.log_deltas)}
            row.update(
                lr=lr_now,
                grad_norm=None if grad_norm is None else float(grad_norm),
                pairs_seen=state["pairs_seen"],
                step_time=time.perf_counter() - t0,
                **reference.metrics(divergence),
            )
            if not all_finite:
                row["nonfinite_skipped"] = state["nonfinite_total"]
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
                accelerator.print(
                    f"xdpo train: stopped at step {step}, checkpoint saved in {out / 'checkpoints'}; to resume, "
                    "run the same command with train.resume_from=latest",
                    flush=True,
                )
                raise KeyboardInterrupt
    except BaseException:
        # keep what was trained: between steps the weights, optimizer and reference agree with `step`
        if world == 1 and step > last_saved and not in_update:
            path = save_checkpoint(accelerator, out, step, state, t.checkpoints_keep, reference.tensors())
            print(f"xdpo train: interrupted; saved {path} (resume with train.resume_from=latest)", flush=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)
        bar.close()
        log.close()

    last = save_checkpoint(accelerator, out, step, state, t.checkpoints_keep, reference.tensors())
    save_final(accelerator, unet, cfg, comps, out / "final", step, checkpoint=last)
    accelerator.wait_for_everyone()
    if t.report_to != "none":
        accelerator.end_training()
    if main:
        (out / "final" / "train_summary.json").write_text(json.dumps({"steps": step, **state}, indent=2))
    accelerator.print(
        f"Done: {step} steps; final model in {out / 'final'}; metrics in {out / 'metrics.jsonl'}"
    )
    return out
