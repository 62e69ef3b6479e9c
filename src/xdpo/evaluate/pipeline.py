"""Pipelines and their sampling settings: the one loader (`load_pipeline`) and in-memory sampler (`generate`).

Sampling defaults: the SD papers' (50 steps, guidance 7.5, DDIM) unless the model is a registered named model
(`register_sampling_defaults`; the digits world registers `digits`) or a family with its own default scheduler.
Same-seed reproducibility: each image gets its own CPU `torch.Generator` seeded with its seed
(`initial_latents`), whatever the batching or the device.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError
from xdpo.evaluate.chunks import BatchChunks
from xdpo.models.families import family_of_class, family_of_pipeline, pipeline_classes

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# --scheduler name -> diffusers class name ("default": keep the pipeline's own).
SCHEDULERS = {
    "default": None,
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}
DTYPES |= {"bf16": "bfloat16", "bfloat16": "bfloat16"}


# Sampling defaults: the SD papers' (50 steps, guidance 7.5, DDIM), and those of named models
# (`--model NAME`), registered by plugins (the digits world registers `digits`).
PAPER_SAMPLING: dict[str, Any] = {"steps": 50, "guidance": 7.5, "scheduler": "ddim"}
MODEL_SAMPLING: dict[str, dict[str, Any]] = {}


def register_sampling_defaults(model: str, **settings: Any) -> None:
    """Sampling defaults (steps, guidance, scheduler) of a named model, e.g. `digits`."""
    MODEL_SAMPLING[model] = dict(settings)


def pipeline_class_name(model: str | Path) -> str | None:
    """`_class_name` of a pipeline folder (or named model), None where it cannot be read."""
    try:
        path = resolve_model(model)
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (ConfigError, OSError, ValueError):
        return None


def sampling_defaults(model: str | Path) -> dict[str, Any]:
    """The SD papers' defaults (or the family's own, e.g. flow-matching pipelines at their pipelines'
    defaults with their own scheduler), updated with a named model's own."""
    from xdpo.evaluate.plugins import load_plugins

    load_plugins()
    named = MODEL_SAMPLING.get(str(model), {}) if not Path(model).exists() else {}
    fam = family_of_class(pipeline_class_name(model) or "")
    return dict((fam.sampling if fam is not None else None) or PAPER_SAMPLING) | named


def resolve_model(model: str | Path) -> Path:
    """A pipeline folder (with model_index.json), or a named model (`digits`, as `model.pretrained`)."""
    from xdpo.models.load import resolve_pretrained  # the one resolver of named models

    path = Path(resolve_pretrained(str(model)))
    if not path.exists():
        raise ConfigError(f"model: {path} does not exist (a diffusers pipeline folder or a named model)")
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"model: {path} is not a diffusers pipeline folder (no model_index.json)")
    return path


def resolve_lora(lora: str | Path) -> tuple[Path, str | None]:
    """(folder, weight_name) for `load_lora_weights`: a weights file, its folder, or a run's `final/`;
    weight_name `PEFT_WEIGHTS` for an adapter in peft's format (LoKr, LoHa: `xdpo.models.lora`)."""
    from xdpo.models.lora import PEFT_WEIGHTS, is_peft_adapter

    path = Path(lora)
    if not path.exists():
        raise ConfigError(f"lora: {path} does not exist")
    if path.is_file():
        return path.parent, path.name
    for folder in (path, path / "final"):
        if (folder / LORA_WEIGHTS).is_file():
            return folder, None
        if is_peft_adapter(folder):
            return folder, PEFT_WEIGHTS
    raise ConfigError(f"lora: no {LORA_WEIGHTS} in {path} (nor in {path / 'final'})")


def load_vae(vae: str | Path, dtype: Any) -> Any:
    """Another VAE (a folder or hub id, e.g. SDXL's fp16-fix VAE) in `dtype`."""
    from diffusers import AutoencoderKL

    from xdpo.models.load import resolve_pretrained

    path = resolve_pretrained(str(vae))
    if not Path(path).exists() and (str(vae).startswith((".", "/", "~")) or str(vae).count("/") != 1):
        raise ConfigError(f"vae: {vae} does not exist (a VAE folder or hub id)")
    try:
        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(f"vae: cannot load {vae}: {str(e).splitlines()[0]}") from None


def resolve_device(device: str | None = None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """fp16 on cuda and fp32 elsewhere unless given; fp16 on CPU is refused."""
    import torch

    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    resolved = getattr(torch, DTYPES[str(dtype)])
    if resolved == torch.float16 and device == "cpu":
        raise ConfigError("dtype: fp16 sampling needs a GPU; use fp32 (or bf16) on CPU")
    return resolved


def load_pipeline(
    model: str | Path,
    *,
    lora: str | Path | None = None,
    scheduler: str = "ddim",
    device: str | None = None,
    dtype: Any = None,
    vae: str | Path | None = None,
) -> Any:
    """Load a text-to-image pipeline (no safety checker, no progress bars), optional LoRA and VAE.

    The one pipeline loader of xdpo (`xdpo sample`, the digits world, the demo): the pipeline class
    is the one its `model_index.json` names (`DiffusionPipeline.from_pretrained`). An SD3 pipeline
    without T5 attends to its zero T5 padding once (`xdpo.models.padding`: exact, several times faster).
    """
    import diffusers

    from xdpo.quiet import progress_bars_off

    path = resolve_model(model)
    adapter = resolve_lora(lora) if lora is not None else None  # a missing path fails before any load
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    device = resolve_device(device)
    kwargs: dict[str, Any] = {"torch_dtype": resolve_dtype(dtype, device)}
    if vae is not None:
        kwargs["vae"] = load_vae(vae, kwargs["torch_dtype"])
    index = json.loads((path / "model_index.json").read_text())
    from xdpo.models.load import null_components

    kwargs |= null_components(index)  # e.g. SD3 saved without T5: diffusers needs them passed as None
    if "safety_checker" in index:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    with progress_bars_off(), warnings.catch_warnings():  # loading bars: noise, and per call
        # diffusers >= 0.36 renames torch_dtype to dtype; older ones lack it
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, **kwargs)
    fam = family_of_pipeline(pipe)
    if adapter is not None:
        folder, weight_name = adapter
        from xdpo.models.lora import PEFT_WEIGHTS, load_peft_adapters

        if weight_name == PEFT_WEIGHTS and fam is not None:  # LoKr / LoHa in peft's format
            load_peft_adapters(pipe, fam.denoiser, folder)
        else:
            pipe.load_lora_weights(folder, **({"weight_name": weight_name} if weight_name else {}))
    if fam is not None:
        fam.prepare_sampling(pipe)  # e.g. SD3 without T5: zero padding attended once, the same images
    if SCHEDULERS[scheduler]:
        flow = type(pipe.scheduler).__name__.startswith("FlowMatch") or pipe.scheduler.config.get(
            "use_flow_sigmas"
        )
        if flow:
            raise ConfigError(
                f"scheduler: {type(pipe).__name__} is a flow-matching pipeline and samples with its own "
                f"{type(pipe.scheduler).__name__}; use --scheduler default, not {scheduler!r}"
            )
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def initial_latents(pipe: Any, n: int, seed: int) -> Any:
    """Starting noise for n images from one seeded CPU generator (image i is independent of batching)."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    fam = family_of_pipeline(pipe)
    if fam is None:
        raise ConfigError(
            f"initial latents: {type(pipe).__name__} is not a pipeline of a family xdpo knows "
            f"({', '.join(pipeline_classes())})"
        )
    if fam.packed_latents:  # packed latents: let the pipeline draw them
        raise ConfigError(
            f"initial latents for {fam.pipeline_class} pipelines: sample with per-image generators instead"
        )
    c = getattr(pipe, fam.denoiser)
    return torch.randn((n, c.config.in_channels, c.config.sample_size, c.config.sample_size), generator=g)


def generate(
    pipe: Any,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = PAPER_SAMPLING["steps"],
    guidance: float = PAPER_SAMPLING["guidance"],
    batch_size: int = 128,
    latents: Any = None,
    progress: bool = True,
    desc: str = "sampling",
    chunks: str | Path | None = None,
) -> list[Any]:
    """RGB PIL images for `prompts`, in memory, from given `latents` or `initial_latents(pipe, n, seed)`.

    A deterministic sampler (DDIM, eta 0) makes image i a function of (prompt i, latents[i]) only;
    `sample_images` instead seeds one generator per image and writes files and a manifest.
    `chunks`: a folder where each finished batch is kept (PNG, lossless) for what it was sampled with; a
    rerun after an interruption reads the finished batches back and samples only the rest (the batches are
    the same, so the images are too).
    """
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    if not prompts:
        return []
    latents = initial_latents(pipe, len(prompts), seed) if latents is None else latents
    kept = BatchChunks(chunks, pipe, prompts, latents, steps, guidance, batch_size) if chunks else None
    images: list[Any] = []
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            done = kept.read(i) if kept else None
            if done is None:
                out = pipe(
                    prompt=prompts[i : i + batch_size],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    latents=latents[i : i + batch_size],
                    output_type="np",
                ).images
                done = [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in out]
                if kept:
                    kept.write(i, done)
            images += done
            bar.update(len(done))
    return images
