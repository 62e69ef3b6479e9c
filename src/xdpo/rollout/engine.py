"""The rollout engine: images from a family's own pipeline, batched across prompts, at recorded seeds.

A job is one image: a prompt and a seed. `RolloutEngine.sample(jobs)` runs the pipeline on chunks of up
to `batch_images` jobs (any mix of prompts: the memory budget is in images per call), each image with its
own CPU generator seeded with its seed, so an image is the same whatever the batching, the process or the
device it is drawn on (the pipeline draws each image's initial noise from its own generator). It returns
the decoded images (what the scorers see), the clean latents the pipeline decoded them from (captured at
the last step with the pipeline's step-end callback, in the denoiser's [N, C, h, w] layout: packed latents
are unpacked with the pipeline's own helper), and the sampler's timestep grid (the model timesteps of the
steps, which the decoupled objectives train on). Guidance <= 1 runs the pipeline without classifier-free
guidance (diffusers' rule). `calls` pads the number of pipeline calls (a sharded model's forwards are
collectives: every process makes as many). Images per second are measured around the pipeline calls.
With a `StochasticPlan` (the likelihood-based objectives) the pipeline samples with the stochastic steps of
`xdpo.rollout.stochastic` and `Samples.steps` holds the recorded transitions (latents before and after,
log-probabilities, the Gaussian's coefficients) of the steps that are trained; `Samples.cfg` is the
guidance scale when the pipeline ran classifier-free guidance (the training step reruns it), else None.
`call_kwargs`: more keywords for every pipeline call (online rounds: the text length the run trains with).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xdpo.rollout.stochastic import (
    StochasticPlan,
    StochasticScheduler,
    sde_generator,
    stack_records,
    stochastic_inner,
)

PER_IMAGE = ("x", "next", "logp")


@dataclass(frozen=True)
class Job:
    """One image to sample: `prompt` at `seed`, member of group `group` (its prompt's K images)."""

    prompt: str
    seed: int
    group: int = 0
    index: int = 0  # the image's index in the round (group * K + k)
    start: int | None = None  # the seed of its initial noise, when not `seed` (a stochastic sampler's pairs)


@dataclass
class Samples:
    images: list = field(default_factory=list)  # PIL images, in job order
    latents: Tensor | None = None  # [n, C, h, w] float32 on the CPU, the clean latents decoded into `images`
    grid: list[float] = field(default_factory=list)  # the sampler's model timesteps, first step first
    seconds: float = 0.0  # wall time of the pipeline calls
    calls: int = 0
    steps: dict[str, Tensor] = field(default_factory=dict)  # stochastic sampling: `stochastic.stack_records`
    cfg: float | None = None  # the classifier-free guidance scale the pipeline ran, or None

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else 0.0


def pipeline_calls(n_images: int, batch_images: int) -> int:
    return -(-n_images // batch_images)


class RolloutEngine:
    """Samples jobs with `pipe` (module docstring). `sampling`: the context the pipeline runs in (default
    inference mode; training rounds pass no_grad for partitioned models and the accelerator's autocast)."""

    def __init__(
        self,
        pipe: Any,
        *,
        steps: int,
        guidance: float,
        batch_images: int = 16,
        size: int | None = None,
        sampling: Callable[[], AbstractContextManager] | None = None,
        keep_latents: bool = True,
        progress: bool = False,
        desc: str = "rollout",
        stochastic: StochasticPlan | None = None,
        call_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from xdpo.models.families import family_of_pipeline

        if batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {batch_images}")
        self.pipe, self.steps, self.guidance, self.batch_images = pipe, steps, guidance, batch_images
        self.size, self.sampling, self.keep_latents = size, sampling or torch.inference_mode, keep_latents
        self.progress, self.desc, self.stochastic = progress, desc, stochastic
        self.call_kwargs = call_kwargs or {}
        self.family = family_of_pipeline(pipe)
        self.inner = None if stochastic is None else stochastic_inner(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)

    def _unpack(self, latents: Tensor, images: list) -> Tensor:
        """The pipeline's latents -> the denoiser's [n, C, h, w]: the family's own `sampled_latents`, else packed
        latents [n, tokens, 4C] through the pipeline's `_unpack_latents`, else as they are."""
        fam = self.family
        if fam is not None and fam.sampled_latents is not None:  # the family's own layout
            w, h = images[0].size
            return fam.sampled_latents(self.pipe, latents, h, w)
        if fam is not None and fam.packed_latents:
            w, h = images[0].size
            return type(self.pipe)._unpack_latents(latents, h, w, self.pipe.vae_scale_factor)
        return latents

    def _call(self, jobs: Sequence[Job]) -> tuple[list, Tensor | None, list[float], dict[str, Tensor]]:
        captured: dict[str, Any] = {"grid": []}
        own = sched = None
        if self.stochastic is not None:  # this call's scheduler: the pipeline's attribute, not its config
            own = self.pipe.scheduler
            sched = StochasticScheduler(self.inner, self.stochastic, [sde_generator(j.seed) for j in jobs])
            object.__setattr__(self.pipe, "scheduler", sched)

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            captured["latents"] = kwargs["latents"]
            captured["grid"].append(float(t))
            return kwargs

        size = {} if self.size is None else {"height": self.size, "width": self.size}
        try:
            with self.sampling():
                out = self.pipe(
                    prompt=[j.prompt for j in jobs],
                    generator=[
                        torch.Generator("cpu").manual_seed(j.seed if j.start is None else j.start)
                        for j in jobs
                    ],
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    output_type="pil",
                    callback_on_step_end=on_step_end if self.keep_latents else None,
                    callback_on_step_end_tensor_inputs=["latents"],
                    **size,
                    **self.call_kwargs,
                )
        finally:
            if sched is not None:
                object.__setattr__(self.pipe, "scheduler", own)
        images = out.images
        latents = captured.get("latents")
        if latents is not None:
            latents = self._unpack(latents, images).detach().float().cpu()
        steps = (
            {} if sched is None else stack_records(sched.records, lambda x: self._unpack(x, images).float())
        )
        return images, latents, captured["grid"], steps

    def sample(self, jobs: Sequence[Job], calls: int | None = None) -> Samples:
        """Images (and latents) of `jobs` in order; `calls`: make this many pipeline calls (>= the chunks
        of `jobs`), the extra ones on a one-image dummy job whose result is discarded."""
        from tqdm.auto import tqdm

        chunks = [list(jobs[i : i + self.batch_images]) for i in range(0, len(jobs), self.batch_images)]
        pad = max(0, (calls or 0) - len(chunks))
        out, latents, parts = Samples(), [], []
        bar = tqdm(total=len(jobs), desc=self.desc, unit="img", disable=not self.progress, dynamic_ncols=True)
        for chunk in chunks + [None] * pad:
            t0 = time.perf_counter()
            images, lat, grid, steps = self._call(chunk or [Job(prompt="", seed=0)])
            out.seconds += time.perf_counter() - t0
            out.calls += 1
            if chunk is None:
                continue  # a padding call (collectives): discarded
            out.images += images
            out.grid = out.grid or grid
            if lat is not None:
                latents.append(lat)
            if steps:
                parts.append(steps)
            bar.update(len(chunk))
            bar.set_postfix(img_per_s=f"{out.images_per_second:.2f}", refresh=False)
        bar.close()
        out.latents = torch.cat(latents) if latents else None
        if parts:  # per image: concatenated; per step: the same in every call
            out.steps = {
                k: torch.cat([p[k] for p in parts]) if k in PER_IMAGE else parts[0][k] for k in parts[0]
            }
        out.cfg = self.guidance if getattr(self.pipe, "do_classifier_free_guidance", False) else None
        return out


def pipeline_with(comps: Any, model: Any, scheduler: str = "default") -> Any:
    """The family's pipeline on the run's components with `model` (the policy, unwrapped) as its denoiser,
    prepared for sampling (`Family.prepare_sampling`), with `scheduler` (`set_scheduler`)."""
    fam = comps.family
    pipe = fam.pipeline_cls()(**{**comps.pipe.components, fam.denoiser: model})
    set_scheduler(pipe, scheduler)
    fam.prepare_sampling(pipe)
    return pipe


def set_scheduler(pipe: Any, name: str) -> None:
    """A `xdpo sample --scheduler` name on `pipe` (`default` keeps its own). Flow-matching pipelines take
    `dpm++`: diffusers' DPMSolverMultistepScheduler on flow sigmas with the pipeline's shift (the
    Flow-DPM-Solver the online papers sample with), besides their own Euler."""
    import diffusers

    from xdpo.errors import ConfigError
    from xdpo.evaluate.pipeline import SCHEDULERS

    if name not in SCHEDULERS:
        raise ConfigError(f"online.scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
    if SCHEDULERS[name] is None:
        return
    config = pipe.scheduler.config
    cls = getattr(diffusers, SCHEDULERS[name])
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        if name != "dpm++":
            raise ConfigError(
                f"online.scheduler: {type(pipe).__name__} samples on flow sigmas: use default or dpm++, not {name!r}"
            )
        flow = {
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "flow_shift": config.get("shift", 1.0),
        }
        pipe.scheduler = cls.from_config(config, **flow)
        return
    pipe.scheduler = cls.from_config(config)
