"""Reference samples: images the reference model draws for a batch's captions, as SePPO's losers
(`Objective.losers="reference"`; Zhang et al. 2024, arXiv 2410.05255v1 §4; docs/math.md §13).

The family's own pipeline samples them through the rollout engine (`xdpo.rollout.engine`), batched across
captions (`seppo.batch_images` images per call), with the reference's denoiser (`Reference.sampling`: LoRA,
the policy's module with the reference adapters swapped in; full fine-tune, the reference copy), at the
objective's sampler settings (`seppo.steps`, `seppo.guidance`, `seppo.scheduler`; 0 / < 0 / default: the
family's sampling defaults) and at `data.resolution`. Each image has its own seed (drawn by the step from
its generator), so the losers are the same whatever the batching and a resumed run draws the same ones.
The sampler returns the clean latents the pipeline decoded, in the denoiser's space (what the step trains on).
The pipeline is built once per sampling denoiser (the reference copy, or the LoRA policy module, whose
weights change in place) and reused every step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from xdpo.rollout.engine import Job, RolloutEngine, pipeline_with


class ReferenceSampler:
    """`sampler(captions, seeds)` -> the reference's clean latents [B, C, h, w] (float32, CPU)."""

    def __init__(
        self, cfg: Any, comps: Any, reference: Any,
        sampling: Callable[[], AbstractContextManager] | None = None,
    ) -> None:  # fmt: skip
        from xdpo.evaluate.pipeline import sampling_defaults

        section = getattr(cfg, cfg.loss.objective)
        d = sampling_defaults(cfg.model.pretrained)
        self.comps, self.reference, self.sampling = comps, reference, sampling or torch.inference_mode
        self.steps = section.steps or d["steps"]
        self.guidance = d["guidance"] if section.guidance < 0 else section.guidance
        self.scheduler = section.scheduler if section.scheduler != "default" else d["scheduler"]
        self.batch_images, self.size = section.batch_images, cfg.data.resolution
        self.pipe: Any = None
        self.pipe_model: Any = None

    def __call__(self, captions: list[str], seeds: list[int]) -> Tensor:
        with self.reference.sampling() as model:
            was_training = model.training
            model.eval()
            try:
                if self.pipe is None or self.pipe_model is not model:  # built once per sampling denoiser
                    self.pipe, self.pipe_model = pipeline_with(self.comps, model, self.scheduler), model
                engine = RolloutEngine(
                    self.pipe, steps=self.steps, guidance=self.guidance, batch_images=self.batch_images,
                    size=self.size, sampling=self.sampling, keep_latents=True, desc="reference samples",
                )  # fmt: skip
                got = engine.sample([Job(c, s) for c, s in zip(captions, seeds, strict=True)])
            finally:
                if was_training:
                    model.train()
                torch.set_grad_enabled(True)
        return got.latents
