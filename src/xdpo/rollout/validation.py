"""Validation images during training: the family's pipeline with the current policy, fixed prompts and seeds.

`ImageValidation` is the recipe's validator (`xdpo.train.validation.Validator`, resolved by name). At each
validation it samples every prompt of `validation.prompts` at every seed of `validation.seeds` (one CPU
generator per image, as `xdpo sample` draws them: at step 0 the images are the base pipeline's), and on
the main process writes `validation/step-NNNNNN/PPP-sS.png` and the grid `validation/grid-step-NNNNNN.png`
(a row per prompt, a column per seed), scores them, logs the grid to the trackers (tensorboard, wandb),
appends a row to `validation/history.jsonl` (with the seconds it took: sampling, scoring, files) and
rewrites `report.html`. The monitors of reward hacking:
- the held-out scorer's mean (`validation.held_out`, a reward the run does not train on);
- diversity: the mean pixel RMS distance between the images of one prompt across seeds (0..1; a collapse
  to one image per prompt drives it to 0);
- drift: the mean pixel RMS distance of each image from its step-0 image (same prompt and seed).
Sampling runs on the main process only, or on every process alike when the model is partitioned (FSDP2,
ZeRO-3: its forwards are collectives), under no autograd and the run's autocast, with the global RNGs
forked, so that validating changes nothing in training; the outcome is broadcast to every process.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.rollout.report import write_report
from xdpo.train.distributed import is_partitioned
from xdpo.train.metrics import MetricsLog, read_metrics
from xdpo.train.validation import FOLDER, HISTORY, Validation


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def rms(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel RMS distance of two uint8 images, on the 0..1 scale."""
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255)


def diversity(arrays: list[np.ndarray], n_seeds: int) -> float | None:
    """Mean over prompts of the mean pairwise RMS distance between the prompt's images (None: one seed)."""
    if n_seeds < 2:
        return None
    per_prompt = []
    for p in range(0, len(arrays), n_seeds):
        group = arrays[p : p + n_seeds]
        per_prompt.append(np.mean([rms(group[i], group[j]) for i in range(n_seeds) for j in range(i)]))
    return float(np.mean(per_prompt))


class ImageValidation:
    """The validator of `validation.*` (module docstring). `scorers`: {name: f(images, prompts) -> scores}
    (default: the rewards of `validation.scorers` and `validation.held_out`, loaded on the main process as
    `xdpo pairs --scorer` loads them)."""

    def __init__(self, cfg: Any, comps: Any, accelerator: Any, out: Path, start_step: int,
                 scorers: dict[str, Any] | None = None) -> None:  # fmt: skip
        from xdpo.evaluate.pipeline import sampling_defaults
        from xdpo.evaluate.prompts import parse_seeds, resolve_prompt_records
        from xdpo.rollout.rewards import load_reward

        v = cfg.validation
        self.cfg, self.comps, self.acc, self.out = cfg, comps, accelerator, Path(out)
        self.folder = self.out / FOLDER
        self.prompts = [r["prompt"] for r in resolve_prompt_records(v.prompts)]
        self.seeds = parse_seeds(v.seeds)
        defaults = sampling_defaults(cfg.model.pretrained)
        self.steps = v.steps or int(defaults["steps"])
        self.guidance = float(defaults["guidance"] if v.guidance is None else v.guidance)
        self.scheduler = defaults.get("scheduler", "default")
        self.main = accelerator.is_main_process
        self.samples = self.main or is_partitioned(accelerator)
        specs = list(dict.fromkeys([*v.scorers, *([v.held_out] if v.held_out else [])]))
        if scorers is None and self.main:  # loaded once, at the start (a bad spec fails before training)
            scorers = {spec: load_reward(spec, device=str(accelerator.device)) for spec in specs}
        self.scorers = scorers or {}
        self.held_out = v.held_out
        self._pipe: Any = None  # built on first use, reused while the policy is the same object
        self.log = MetricsLog(self.folder / HISTORY, resume_step=start_step, enabled=self.main)
        self.rows = read_metrics(self.folder / HISTORY) if self.main else []
        self.base = self._load(0) if start_step > 0 and self.main else None  # step 0's images, for drift

    # ---- sampling ---------------------------------------------------------------------------------------
    def pipeline(self, policy: Any) -> Any:
        """The family's pipeline on the run's components, `policy` as its denoiser, the sampling scheduler."""
        import diffusers

        from xdpo.evaluate.pipeline import SCHEDULERS

        comps, fam = self.comps, self.comps.family
        if self._pipe is not None and getattr(self._pipe, fam.denoiser) is policy:
            return self._pipe
        parts = {**comps.pipe.components, fam.denoiser: policy}
        if "safety_checker" in parts:  # as `load_pipeline`: none, and no warning about it
            parts["requires_safety_checker"] = False
        pipe = fam.pipeline_cls()(**parts)
        name = SCHEDULERS.get(self.scheduler)
        if name and not type(pipe.scheduler).__name__.startswith("FlowMatch"):
            pipe.scheduler = getattr(diffusers, name).from_config(comps.pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
        return pipe

    def sample(self, policy: Any) -> list[Any]:
        """Every prompt at every seed (PIL images, prompt-major), one pipeline call per prompt."""
        pipe, acc = self.pipeline(policy), self.acc
        partitioned = is_partitioned(acc)
        was_training = policy.training
        policy.eval()
        images: list[Any] = []
        devices = [acc.device] if acc.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), _sampling(acc, partitioned):
                for prompt in self.prompts:
                    images += pipe(
                        prompt=[prompt] * len(self.seeds),
                        generator=[torch.Generator("cpu").manual_seed(s) for s in self.seeds],
                        num_inference_steps=self.steps,
                        guidance_scale=self.guidance,
                        output_type="pil",
                    ).images
        finally:
            if was_training:
                policy.train()
        return images

    # ---- the protocol -------------------------------------------------------------------------------------
    def validate(self, step: int, policy: Any) -> Validation:
        start = time.perf_counter()
        images = self.sample(policy) if self.samples else None
        result = self.record(step, images, start) if self.main else None
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result], from_process=0)[0]
        return result

    def record(self, step: int, images: list[Any], start: float) -> Validation:
        """Files, scores, monitors, trackers and the report of one validation (main process)."""
        from diffusers.utils import make_image_grid

        folder = self.folder / step_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / self.file_name(i))
        grid = make_image_grid(images, rows=len(self.prompts), cols=len(self.seeds))
        grid_file = f"{FOLDER}/grid-{step_name(step)}.png"
        grid.save(self.out / grid_file)
        prompts = [p for p in self.prompts for _ in self.seeds]
        scores = {name: float(np.mean(fn(images, prompts))) for name, fn in self.scorers.items()}
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        if step == 0:
            self.base = arrays
        drift = (
            None
            if self.base is None
            else float(np.mean([rms(a, b) for a, b in zip(arrays, self.base, strict=True)]))
        )
        held_out = scores.get(self.held_out) if self.held_out else None
        row = {"step": step, "grid": grid_file, "scores": scores, "held_out": held_out,
               "diversity": diversity(arrays, len(self.seeds)), "drift": drift,
               "seconds": time.perf_counter() - start}  # fmt: skip
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        self.log.write(row)
        metrics = {f"validation/{k}": v for k, v in scores.items()}
        metrics |= {
            f"validation/{k}": row[k] for k in ("held_out", "diversity", "drift") if row[k] is not None
        }
        self.log_grid(step, grid)
        write_report(self.out, self.rows, self.prompts, self.seeds, held_out=self.held_out)
        history = [r["held_out"] for r in self.rows if r.get("held_out") is not None]
        return Validation(step, metrics, held_out, history)

    def log_grid(self, step: int, grid: Any) -> None:
        """The grid as an image in the run's trackers (accelerate's tracker API)."""
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation/grid": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation/grid": [grid]}, step=step)

    def file_name(self, i: int) -> str:
        p, k = divmod(i, len(self.seeds))
        return f"{p:03d}-s{self.seeds[k]}.png"

    def _load(self, step: int) -> list[np.ndarray] | None:
        folder = self.folder / step_name(step)
        files = [folder / self.file_name(i) for i in range(len(self.prompts) * len(self.seeds))]
        if not all(f.is_file() for f in files):
            return None
        from PIL import Image

        return [np.asarray(Image.open(f).convert("RGB")) for f in files]


@contextmanager
def _sampling(accelerator: Any, partitioned: bool):
    """No autograd (no_grad for partitioned models, else inference mode) and the run's autocast."""
    with (torch.no_grad if partitioned else torch.inference_mode)(), accelerator.autocast():
        yield
