"""Sampling with diffusers pipelines: prompts x seeds -> `images/NNNNN.png` + `manifest.jsonl`.

A video family's pipeline (Wan) writes `videos/NNNNN.mp4` (`num_frames` frames at `fps`, PyAV) and, as the
row's image, a strip of up to 8 of its frames `images/NNNNN.png` (what reports show); the manifest row
names both (`file`, `video`).

Layout `hpsv2` writes what the official HPSv2 benchmark evaluation reads instead:
`<style>/<prompt_index:05d>.jpg` (one seed) or `seed<S>/<style>/<prompt_index:05d>.jpg` (several
seeds; each `seed<S>` folder is then one official-layout folder). The manifest lists every image
either way, with its `style` and `prompt_index` when the prompt set has them.

Same-seed reproducibility: every (prompt, seed) image gets its own CPU `torch.Generator` seeded
with `seed`, and the pipeline receives one generator per image, so its initial noise (and any
per-step noise, e.g. DDPM) is the same whatever the batching or the device.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.chunks import BatchChunks, finished_batches
from xdpo.evaluate.prompts import parse_seeds, resolve_prompt_records
from xdpo.models.families import family_of_class, family_of_pipeline, pipeline_classes

MANIFEST = "manifest.jsonl"
IMAGES = "images"
VIDEOS = "videos"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# Files derived from a sample folder, removed when the folder is sampled again.
DERIVED = ("scores.parquet", "scores.csv", "scores.meta.json", "summary.json", "summary.md")
LAYOUTS = ("default", "hpsv2")
JPEG_QUALITY = 95

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


def _clear_previous(out: Path) -> None:
    """Remove the images and derived files of an earlier run in `out` (only files we wrote)."""
    previous = []
    if (out / MANIFEST).is_file():
        try:
            previous = [out / r["file"] for r in read_manifest(out)]
        except (DataError, KeyError, TypeError):
            previous = []
    for name in DERIVED + (MANIFEST,):
        (out / name).unlink(missing_ok=True)
    previous += list((out / IMAGES).glob("*.png")) + list((out / VIDEOS).glob("*.mp4"))
    for path in previous:
        inside = path.resolve().is_relative_to(out.resolve())
        if inside and re.fullmatch(r"\d{5,}\.(png|jpg|mp4)", path.name):
            path.unlink(missing_ok=True)
            for parent in path.parents:  # style / seed folders left empty
                if parent.resolve() == out.resolve():
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break


def _image_file(record: dict[str, Any], seed: int, index: int, layout: str, n_seeds: int) -> str:
    """Where an image goes: images/NNNNN.png, or the official HPSv2 benchmark layout."""
    if layout == "default":
        return f"{IMAGES}/{index:05d}.png"
    file = f"{record['style']}/{record['prompt_index']:05d}.jpg"
    return f"seed{seed}/{file}" if n_seeds > 1 else file


def sample_images(
    model: str | Path,
    prompts: str | Path | Sequence[str | dict[str, Any]],
    seeds: str | int | Sequence[int],
    *,
    out_dir: str | Path,
    lora: str | Path | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    scheduler: str = "ddim",
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    vae: str | Path | None = None,
    layout: str = "default",
    prompt_set: str | None = None,
    progress: bool = True,
    resume: bool = False,
    num_frames: int | None = None,
    fps: float | None = None,
) -> Path:
    """Sample every prompt x every seed; write `out_dir/images/*.png` + `manifest.jsonl`; return out_dir.
    A video family's pipeline also writes `videos/*.mp4` of `num_frames` frames at `fps` (default: the
    family's sampling defaults, Wan's 81 frames at 16 fps), the images being frame strips.

    `prompts`: a list (of strings or records with "prompt" and optionally "style"/"prompt_index"),
    a prompts file or a named set (see `resolve_prompt_records`); `seeds`: a list or "0,1,2" /
    "0-4" / "n:5". Repeated prompts are sampled once, except in a styled set (the HPSv2 benchmark),
    whose positions matter. `layout="hpsv2"` writes the official HPSv2 layout (module docstring).
    `prompt_set` (default: `prompts` when it is a name or path) is recorded in the manifest.
    Defaults follow the SD papers (50 steps, guidance 7.5); a guidance <= 1 disables guidance.
    `resume`: keep the whole batches an interrupted call with the same settings already wrote (its
    `manifest.jsonl.tmp`) and sample only the rest (same batches, same images).
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from xdpo.data.video import frame_strip, write_video

    records = resolve_prompt_records(prompts)
    if not any("style" in r for r in records):  # dedupe plain prompts; styled sets keep positions
        first: dict[str, dict[str, Any]] = {}
        for r in records:
            first.setdefault(r["prompt"], r)
        records = list(first.values())
    if prompt_set is None and isinstance(prompts, str | Path):
        prompt_set = str(prompts)
    seed_list = parse_seeds(seeds)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "hpsv2" and not all("style" in r and "prompt_index" in r for r in records):
        raise ConfigError("layout hpsv2 needs the HPSv2 benchmark prompts (--prompts hpsv2 or hpsv2:FOLDER)")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    device = resolve_device(device)
    pipe = load_pipeline(model, lora=lora, scheduler=scheduler, device=device, dtype=dtype, vae=vae)
    fam = family_of_pipeline(pipe)
    video = fam is not None and fam.video
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
    if any(size is not None and (size < scale or size % scale) for size in (height, width)):
        raise ConfigError(f"height and width ({height}, {width}) must be positive multiples of {scale}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(resolve_model(model)),
        "lora": str(lora) if lora is not None else None,
        "steps": int(steps),
        "guidance": float(guidance),
        "scheduler": scheduler,
        "scheduler_class": type(pipe.scheduler).__name__,
    }
    if vae is not None:
        settings["vae"] = str(vae)
    if prompt_set is not None:
        settings["prompt_set"] = prompt_set
    call: dict[str, Any] = fam.guidance_kwargs(guidance) if fam is not None else {"guidance_scale": guidance}
    if video:
        defaults = fam.sampling or {}
        num_frames = int(num_frames or defaults.get("num_frames", 81))
        fps = float(fps or defaults.get("fps", 16))
        settings |= {"num_frames": num_frames, "fps": fps}
        call["num_frames"] = num_frames
    jobs = [(r, s) for r in records for s in seed_list]
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    tmp = out / (MANIFEST + ".tmp")
    kept = finished_batches(out, tmp, settings, jobs, batch_size) if resume else []
    if not kept:
        _clear_previous(out)
    index = len(kept)
    with tmp.open("w", encoding="utf-8") as manifest:
        for line in kept:
            manifest.write(line)
        manifest.flush()
        for batch in tqdm(
            batches[index // batch_size :], desc="sampling", unit="batch", disable=not progress
        ):
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
            result = pipe(
                prompt=[r["prompt"] for r, _ in batch],
                generator=generators,
                num_inference_steps=steps,
                height=height,
                width=width,
                output_type="np" if video else "pil",
                **call,
            )
            clips = result.frames if video else [None] * len(batch)
            images = [frame_strip(c) for c in clips] if video else result.images
            for (rec, seed), image, clip in zip(batch, images, clips, strict=True):
                file = _image_file(rec, seed, index, layout, len(seed_list))
                (out / file).parent.mkdir(parents=True, exist_ok=True)
                image.save(out / file, **({"quality": JPEG_QUALITY} if file.endswith(".jpg") else {}))
                record = {"index": index, "prompt": rec["prompt"], "seed": seed, "file": file, **settings}
                size = image.size if clip is None else np.asarray(clip).shape[2:0:-1]  # (width, height)
                if video:
                    record["video"] = f"{VIDEOS}/{index:05d}.mp4"
                    write_video(clip, out / record["video"], fps)
                record |= {"height": int(size[1]), "width": int(size[0])}  # the pipeline's default if None
                record |= {k: rec[k] for k in ("style", "prompt_index") if k in rec}
                manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
                index += 1
            manifest.flush()  # a whole batch at a time: what a resumed call keeps
    os.replace(tmp, out / MANIFEST)
    return out


def read_manifest(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of `folder/manifest.jsonl`; errors name the file and line."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: --images must be a folder written by `xdpo sample`")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i}: expected a JSON object")
        missing = [k for k in ("prompt", "seed", "file") if k not in row]
        if missing:
            raise DataError(f"{path}: line {i}: missing key(s) {', '.join(missing)}")
        if not isinstance(row["prompt"], str) or not isinstance(row["seed"], int):
            raise DataError(f"{path}: line {i}: 'prompt' must be a string and 'seed' an integer")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
