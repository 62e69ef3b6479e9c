"""Sampling to files with diffusers pipelines (loaded by `xdpo.evaluate.pipeline`): prompts x seeds -> `images/NNNNN.png` + `manifest.jsonl`.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.chunks import finished_batches
from xdpo.evaluate.pipeline import load_pipeline, resolve_device, resolve_model
from xdpo.evaluate.prompts import parse_seeds, resolve_prompt_records
from xdpo.models.families import family_of_pipeline

MANIFEST = "manifest.jsonl"
IMAGES = "images"
VIDEOS = "videos"
# Files derived from a sample folder, removed when the folder is sampled again.
DERIVED = ("scores.parquet", "scores.csv", "scores.meta.json", "summary.json", "summary.md")
LAYOUTS = ("default", "hpsv2")
JPEG_QUALITY = 95


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
