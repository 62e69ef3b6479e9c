"""The training recipe: preference fine-tuning of a diffusion model of any family, in named phases.

  setup    accelerator, resume point, data, models (a reference only if the objective needs one),
           optimizer and schedule, accelerate's prepare, the objective's state, checkpoint restore
  step     one optimizer step: grad_accum micro-steps (`step.train_step`), one agreement across processes
           (all finite? a stop requested?), clip, optimizer step, schedule, the reference's update
  save     a resumable checkpoint (accelerate state + trainer_state.json + the reference's weights)
  validate images, scores and reward-hacking monitors at step 0, every validation.every steps and at the
           end, through a validator built above this layer (`xdpo.train.validation`); may stop the run
  run      step until train.max_steps or a stop request, logging every step, checkpointing on schedule;
           then final/ (docs/design.md §2).
SIGINT and SIGTERM (preemption) finish the step, save a checkpoint on every process and return with
`stopped` set; a crash between steps saves what was trained (one process).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from xdpo.config import Config, dump_yaml
from xdpo.errors import XdpoError
from xdpo.models.load import check_pipeline
from xdpo.objectives import get_objective
from xdpo.train import checkpoint as ckpt
from xdpo.train.batches import mix_seed
from xdpo.train.distributed import (
    clip_grad_norm,
    deepspeed_stage,
    is_partitioned,
    make_accelerator,
    optimizer_step,
    policy_autocast,
)  # fmt: skip
from xdpo.train.losers import loser_sampler, sampling_context
from xdpo.train.metrics import Diagnostics, MetricsLog, count_totals
from xdpo.train.optim import learning_rate
from xdpo.train.setup import describe, make_probe, prepare_models, step_context
from xdpo.train.sources import RoundFactory, TrainData, default_rounds, open_train_data
from xdpo.train.state import TrainerState
from xdpo.train.step import train_step
from xdpo.train.stop import StopRequest
from xdpo.train.validation import ValidationRun, ValidatorFactory


class Recipe:
    """One training run of `cfg`; `run()` trains (or resumes) it and returns the output folder."""

    def __init__(
        self, cfg: Config, accelerator: Any = None, rounds: RoundFactory | None = None,
        validators: ValidatorFactory | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.out, self.rounds, self.validators = cfg, Path(cfg.output_dir), rounds, validators
        self.objective = get_objective(cfg.loss.objective)
        self.acc = accelerator or make_accelerator(cfg, self.out)  # DDP, FSDP2, DeepSpeed (forced on CPU)
        self.acc.gradient_accumulation_steps = cfg.train.grad_accum  # also when an accelerator is passed in
        self.state, self.stopped, self.resume = TrainerState(), False, None

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg, acc, t = self.cfg, self.acc, self.cfg.train
        self.resume = ckpt.resume_point(acc, self.out, t.resume_from)
        self.family = check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision)  # fail fast
        setup = {"world": acc.num_processes, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                 "lora_rank": cfg.model.lora_rank}  # fmt: skip
        if cfg.model.lora_text_encoder:
            setup["lora_text_encoder"] = True
        if self.resume is not None:  # read once: the set-up check, then every counter from it
            self.state = TrainerState.read(self.resume)
            self.state.check_setup(setup, self.resume, acc.print)
        self.state.setup = setup
        self.data: TrainData | None = None
        if not cfg.online.enabled:  # offline data fails fast, before any weights load
            self.data = open_train_data(cfg, self.family, acc, self.state.step, None)
        set_seed(cfg.seed)  # LoRA initialisation and anything else drawing from the global RNGs
        self.models, self.policy, self.optimizer, self.lr_scheduler = prepare_models(cfg, acc, self.objective)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]  # FSDP2 shards replaced them
        self.params += self.models.text_params  # the text encoders' LoRA (model.lora_text_encoder): clipped,
        # averaged by the EMA and saved with the denoiser's
        self.lr = learning_rate(t, acc.num_processes)
        acc.register_for_checkpointing(self.lr_scheduler)
        self.ema = ckpt.make_ema(self.params, t.ema_decay)  # train.ema_decay > 0: diffusers' EMAModel
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        images_per_step = (
            (2 if cfg.data.format == "pairs" else 1) * t.batch_size * t.grad_accum * acc.num_processes
        )
        self.obj_state = self.objective.state(images_per_step) if self.objective.state else None
        rows = t.batch_size * t.grad_accum * acc.num_processes
        self.diag = Diagnostics(cfg, self.objective, self.models.process.num_steps, rows, self.lr)
        self.ctx = step_context(
            cfg, self.models, self.objective, policy=self.policy, autocast=policy_autocast(self.acc, self.policy), gather=acc.gather,
            rank=acc.process_index, frozen=torch.no_grad if is_partitioned(acc) else torch.inference_mode,
            state=self.obj_state,
        )  # fmt: skip
        self.ctx.losers = loser_sampler(
            self.objective, cfg, self.models.comps, self.models.reference,
            sampling=lambda: sampling_context(acc, is_partitioned(acc)),
        )  # fmt: skip
        if self.resume is not None:
            self.restore(self.resume)
        self.start_output()
        if cfg.online.enabled:
            maker = (self.rounds or default_rounds(self.objective))(
                cfg, self.models.comps, acc, self.out, reference=self.models.reference
            )
            self.data = open_train_data(
                cfg, self.family, acc, self.state.step, lambda r: maker(r, acc.unwrap_model(self.policy))
            )
        ref = self.models.reference
        if ref is not None and ref.needs_probe:
            ref.probe = make_probe(cfg, self.data.probe, self.ctx, acc.process_index, acc.num_processes)
        acc.print(describe(self))
        acc.print(self.diag.about())
        self.validation = None  # validation.prompts: images, scores and monitors (xdpo.rollout.validation)
        if cfg.validation.prompts:
            self.validation = ValidationRun(
                cfg, self.models.comps, acc, self.out, self.state.step, self.keep_weights, self.validators
            )

    def restore(self, path: Path) -> None:
        """Weights, optimizer, schedule and RNGs (accelerate), then the reference and the objective's state."""
        tensors = ckpt.load_checkpoint(self.acc, path)
        ckpt.load_text_adapters(self.models.comps.text_lora, path)
        if self.models.reference is not None and self.state.reference:
            self.models.reference.load(self.state.reference, tensors)
        if self.obj_state is not None:
            self.obj_state.load(self.state.objective_state or [])
        self.acc.print(f"Resuming from {path} at step {self.state.step}")

    def start_output(self) -> None:
        """config.yaml (the previous one kept aside on resume), metrics.jsonl, trackers."""
        cfg, out, acc, step = self.cfg, self.out, self.acc, self.state.step
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            for moved in ckpt.set_aside_newer(out, step) if self.resume is not None else []:
                acc.print(f"Set aside {moved} (newer than the checkpoint resumed from)")
            if self.resume is not None and (out / "config.yaml").is_file():
                (out / "config.yaml").replace(out / f"config.before-resume-{step}.yaml")
            dump_yaml(cfg, out / "config.yaml")
            if cfg.train.report_to != "none":
                acc.init_trackers("xdpo")
        self.log = MetricsLog(out / "metrics.jsonl", resume_step=step, enabled=acc.is_main_process)

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, stop: StopRequest) -> dict[str, Any]:
        cfg, acc, t, st = self.cfg, self.acc, self.cfg.train, self.state
        t0, records, finite = time.perf_counter(), [], []
        # accelerate's micro-batch counter, derived from ours (a resume cannot shift it): accumulate() syncs
        # gradients on the last micro-batch only, and backward() divides the loss by grad_accum
        acc.step = st.step * t.grad_accum
        for micro in range(t.grad_accum):
            gen = torch.Generator(acc.device).manual_seed(
                mix_seed(cfg.seed, st.step, micro, acc.process_index)
            )
            with acc.accumulate(self.policy):
                res = train_step(self.ctx, next(self.data.batches), gen)
                loss = res.out.loss.mean()
                acc.backward(loss)
            finite.append(torch.isfinite(loss.detach()))
            records.append((res.out, res.timesteps, res.weight))
        # one collective per step, on every process alike: all finite? anyone asked to stop?
        flags = torch.stack([torch.stack(finite).all(), torch.tensor(stop.requested, device=acc.device)])
        flags = acc.gather(flags.float().unsqueeze(0)).view(-1, 2)
        all_finite, stop.requested = bool(flags[:, 0].min() > 0), bool(flags[:, 1].max() > 0)
        self.in_update = True  # until the bookkeeping is done, the state is between two steps
        grad_norm, lr_now = self.apply_update(all_finite), self.lr_scheduler.get_last_lr()[0]
        if self.ema is not None and all_finite:
            self.ema.step(self.params)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        ref = self.models.reference
        divergence = (
            None if ref is None else ref.maybe_update(st.step, cfg.seed, chunk=max(2 * t.batch_size, 1))
        )
        st.pairs_seen = st.step * t.batch_size * t.grad_accum * acc.num_processes
        st.reference = {} if ref is None else ref.state()
        st.objective_state = None if self.obj_state is None else self.obj_state.state()
        st.nonfinite_total += 0 if all_finite else 1
        fresh = cfg.online.enabled and (st.step - 1) % cfg.online.every == 0  # the round's first update
        row = {"step": st.step, **self.diag.row(acc, records, keep_deltas=t.log_deltas, fresh=fresh), "lr": lr_now,
               "grad_norm": None if grad_norm is None else float(grad_norm), "pairs_seen": st.pairs_seen,
               "epoch": st.pairs_seen / self.data.n_items, "step_time": time.perf_counter() - t0,
               **(ref.metrics(divergence) if ref else {}), **count_totals(acc, [r[0] for r in records])}  # fmt: skip
        if not all_finite:
            row["nonfinite_skipped"] = st.nonfinite_total
        if acc.optimizer_step_was_skipped:  # fp16 grad scaler found inf/nan gradients
            row["skipped"] = True
        self.log.write(row)
        self.in_update = False
        if warning := self.diag.chance_warning(st.step, row):
            acc.print(warning)
        return row

    def apply_update(self, all_finite: bool) -> torch.Tensor | None:
        """Clip and step when every process's loss was finite; else skip (or stop) without touching weights."""
        t, st = self.cfg.train, self.state
        if (
            deepspeed_stage(self.acc) is not None
            and not all_finite
            and not self.acc.optimizer_step_was_skipped
        ):
            raise XdpoError(  # DeepSpeed steps inside backward(); it skips non-finite gradients, not a loss
                f"non-finite loss at step {st.step + 1} with finite gradients: DeepSpeed applied the update; "
                "the weights after it are not saved (resume from the last checkpoint with a lower "
                "train.learning_rate or loss.beta)"
            )
        if not all_finite:
            self.optimizer.zero_grad(set_to_none=True)  # the weights never see a non-finite gradient
            in_a_row = st.nonfinite_in_a_row + 1
            if t.nonfinite == "stop" or in_a_row > t.max_nonfinite:
                self.in_update = False  # nothing moved: the state is the last step's
                raise XdpoError(
                    f"non-finite loss at step {st.step + 1} ({in_a_row} in a row; weights not "
                    "updated, checkpoints intact): lower train.learning_rate or loss.beta, or use bf16 / "
                    "mixed_precision=no if fp16 overflows"
                    + ("" if t.nonfinite == "stop" else f"; train.max_nonfinite={t.max_nonfinite}")
                )
            st.nonfinite_in_a_row = in_a_row
            return None
        st.nonfinite_in_a_row = 0
        if self.models.text_params and self.acc.num_processes > 1:  # outside DDP's wrapper: average by hand
            for p in self.models.text_params:
                if p.grad is not None:
                    p.grad = self.acc.reduce(p.grad, reduction="mean")
        norm = clip_grad_norm(self.acc, self.params, t.max_grad_norm) if t.max_grad_norm > 0 else None
        optimizer_step(self.acc, self.optimizer)
        return norm

    # ---- save --------------------------------------------------------------------------------------
    def save(self) -> Path:
        ref = self.models.reference
        path = ckpt.save_checkpoint(
            self.acc, self.out, self.state.step, self.state, self.cfg.train.checkpoints_keep,
            {} if ref is None else ref.tensors(), text_adapters=self.models.comps.text_lora,
        )  # fmt: skip
        self.last_saved = self.state.step
        return path

    def keep_weights(self, folder: Path, step: int) -> None:
        """The policy's weights in final/'s format in `folder` (validation's best/); DeepSpeed's from a checkpoint."""
        last = self.save() if deepspeed_stage(self.acc) is not None else None
        ckpt.save_final(self.acc, self.policy, self.cfg, self.models.comps, folder, step, checkpoint=last)

    def validate(self) -> bool:
        """Validation when due (step 0, validation.every, the last step); True: validation.stop_on stops."""
        return self.validation is not None and self.validation(self.state.step, self.policy)

    # ---- run ---------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.setup()
        t, acc, st = self.cfg.train, self.acc, self.state
        self.last_saved, self.in_update = st.step, False
        bar = tqdm(total=t.max_steps, initial=st.step, disable=not acc.is_main_process, desc="train",
                   dynamic_ncols=True)  # fmt: skip
        with StopRequest() as stop:
            try:
                if st.step == 0:
                    self.validate()  # the base model's images
                while st.step < t.max_steps and not stop.requested:
                    if (why := self.data.stop_before(st.step)) is not None:  # online.stop_on
                        acc.print(f"xdpo train: stopping at step {st.step}: {why}", flush=True)
                        break
                    row = self.train_step(stop)
                    if acc.is_main_process and t.report_to != "none":
                        acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=st.step)
                    bar.update(1)
                    if st.step % t.log_every == 0 or st.step == t.max_steps:
                        bar.set_postfix(
                            loss=f"{row['loss']:.4f}",
                            acc=f"{row['implicit_acc']:.2f}",
                            epoch=f"{row['epoch']:.2f}",
                            refresh=False,
                        )
                    if not stop.requested and self.validate():
                        break  # validation.stop_on: finish() saves the last checkpoint and final/
                    due = t.checkpoint_every and st.step % t.checkpoint_every == 0 and st.step < t.max_steps
                    if due or stop.requested:
                        self.save()
            except BaseException:
                # keep what was trained: between steps the weights, optimizer and reference agree with `step`
                if acc.num_processes == 1 and st.step > self.last_saved and not self.in_update:
                    path = self.save()
                    print(
                        f"xdpo train: interrupted; saved {path} (resume with train.resume_from=latest)",
                        flush=True,
                    )
                raise
            finally:
                bar.close()
                self.log.close()
        if stop.requested:
            self.stopped = True
            acc.print(
                f"xdpo train: stopped at step {st.step}, checkpoint saved in {self.out / 'checkpoints'}; to "
                "resume, run the same command with train.resume_from=latest",
                flush=True,
            )
            return self.out
        self.finish()
        return self.out

    def finish(self) -> None:
        """The last checkpoint, final/ (whole weights or LoRA in the family's format) and the summary."""
        acc, out, st = self.acc, self.out, self.state
        last = self.save()
        ckpt.save_final(
            acc, self.policy, self.cfg, self.models.comps, out / "final", st.step, checkpoint=last
        )
        if self.ema is not None:  # the EMA weights, saved as final/ is, beside it
            with ckpt.ema_weights(self.ema, self.params):
                ckpt.save_final(acc, self.policy, self.cfg, self.models.comps, out / "final-ema", st.step)
        acc.wait_for_everyone()
        if self.cfg.train.report_to != "none":
            acc.end_training()
        if acc.is_main_process:
            (out / "final" / "train_summary.json").write_text(ckpt.summary_json(st))
        acc.print(
            f"Done: {st.step} steps; final model in {out / 'final'}; metrics in {out / 'metrics.jsonl'}"
        )


def train(
    cfg: Config, accelerator: Any = None, rounds: RoundFactory | None = None,
    validators: ValidatorFactory | None = None,
) -> Path:  # fmt: skip
    """Run (or resume) a training run; return `output_dir`. `rounds`: the online round maker's factory
    (default: the built-in one for the objective's data kind, `xdpo.rollout.rounds`); `validators`: the
    validator's factory (default `xdpo.rollout.validation.ImageValidation`). A run stopped by SIGINT / SIGTERM has saved a
    checkpoint; `train` then raises `KeyboardInterrupt`, so that a caller running several stages (the demo,
    the study, a script) stops with it (`Recipe.run` itself just returns with `stopped` set)."""
    recipe = Recipe(cfg, accelerator, rounds, validators)
    out = recipe.run()
    if recipe.stopped:
        raise KeyboardInterrupt
    return out
