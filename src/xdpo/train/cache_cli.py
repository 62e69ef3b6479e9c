"""`xdpo cache`: encode every usable pair's images (VAE posterior) and every caption (conditions) once.

Writes the format of `xdpo.data.cache` into the folder `data.cache`, for the config's model, data,
resolution, flips and prompt dropout; `xdpo train` with the same config then reads it instead of running
the VAE and the text encoders each step. Under `accelerate launch` / torchrun process r encodes the
shards k = r, r + n, ... of n processes; the main process writes the manifest when all are done.
Resumable: each shard is written under a temporary name and renamed when complete; a rerun removes
leftovers and encodes only the shards that are missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from xdpo.config import Config, load_config
from xdpo.data.cache import (
    FLIP,
    FORMAT,
    LATENT_KEYS,
    built_with,
    check_manifest,
    depends,
    open_pairs,
    pair_shard,
    read_manifest,
    save_shard,
    shard_layout,
    shard_metadata,
    text_shard,
    write_manifest,
)
from xdpo.errors import ConfigError, XdpoError

EPILOG = """\
Examples:
  xdpo cache --config configs/sd15-pickapic-dpo.yaml data.path=/data/pickapic data.cache=/data/cache-sd15-512
  xdpo train --config configs/sd15-pickapic-dpo.yaml data.path=/data/pickapic data.cache=/data/cache-sd15-512
  accelerate launch -m xdpo cache --config ...       (every process encodes its share of the shards)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="encode the training pairs' latents and captions once (data.cache)",
        description=(
            "Encode both images of every usable pair with the VAE (posterior mean and log-variance; both "
            "orientations when data.flip is set) and every distinct caption with the text encoders, into the "
            "folder data.cache. Takes the same config as `xdpo train`; a run with data.cache set reads the "
            "cache. Random crops cannot be cached. Rerun the same command to finish an interrupted cache."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (the training config)")
    p.add_argument("--shard-size", type=int, default=256, help="pairs (and captions) per shard file")
    p.add_argument("--batch-size", type=int, default=8, help="pairs (or captions) per encoder call")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.cache=DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    build_cache(cfg, shard_size=args.shard_size, batch_size=args.batch_size)
    return 0


def _denoiser_config(cfg: Config, fam: Any) -> SimpleNamespace:
    """The denoiser's config without its weights (Flux's conditions read `guidance_embeds`)."""
    from xdpo.models.load import read_model_index, resolve_pretrained

    lib, cls = read_model_index(cfg.model.pretrained, cfg.model.revision)[fam.denoiser]
    klass = getattr(importlib.import_module(lib), cls)
    conf = klass.load_config(
        resolve_pretrained(cfg.model.pretrained), subfolder=fam.denoiser, revision=cfg.model.revision
    )
    return SimpleNamespace(**conf)


def load_encoders(cfg: Config, fam: Any, device: torch.device) -> Any:
    """The pipeline without its denoiser; VAE and text encoders on `device`, as a training run places them."""
    from xdpo.models.load import half_precision, load_components
    from xdpo.train.setup import place_frozen

    comps = load_components(
        cfg.model, cfg.family, skip=(fam.denoiser,), text_dtype=half_precision(cfg.train.mixed_precision)
    )
    comps.denoiser = SimpleNamespace(config=_denoiser_config(cfg, fam))
    place_frozen(comps, cfg.train.mixed_precision, device)
    return comps


def mirror_crops(original: torch.Tensor, crop: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """SDXL's crop (top, left) of mirrored images: left -> resized width - left - W, as `transforms.Placed`
    records it, for a square `size` (the resolution) or a (W, H) bucket; `original` holds (height, width)
    before resizing. [N, 2] each."""
    from xdpo.data.transforms import cover_size

    target = (size, size) if isinstance(size, int) else tuple(size)
    out = crop.clone()
    for i, (h, w) in enumerate(original.tolist()):
        out[i, 1] = cover_size(w, h, target)[0] - crop[i, 1] - target[0]
    return out


@torch.no_grad()
def encode_pair_shard(
    comps: Any,
    pairs: Any,
    keys: list[tuple[int, int]],
    flips: bool,
    batch_size: int,
    num_workers: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Posterior parameters (in the VAE's dtype) of both images of `keys`' pairs, labels, rows, captions:
    `posterior_params`, what a training step's `encode` computes from the same rows."""
    from xdpo.data import collate_pairs
    from xdpo.data.encode import posterior_params

    vae, device = comps.vae, comps.vae.device
    loader = torch.utils.data.DataLoader(
        pairs,
        batch_sampler=[keys[j : j + batch_size] for j in range(0, len(keys), batch_size)],
        collate_fn=collate_pairs,
        num_workers=num_workers,
    )
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    captions: list[str] = []
    for b in loader:
        n = b.groups
        pixels = b.pixels.to(device)
        for suffix, px in (("", pixels), (FLIP, pixels.flip(-1)))[: 2 if flips else 1]:
            mean, logvar = posterior_params(comps, px)  # float32 from the VAE's dtype: cast back losslessly
            for key, value in zip(LATENT_KEYS, (mean[:n], logvar[:n], mean[n:], logvar[n:]), strict=True):
                parts[key + suffix].append(value.to(vae.dtype).cpu())
        parts["label_w"].append(b.label)
        parts["row"].append(b.rows)
        sizes = dict(b.sizes)  # SDXL's, [2B, 2] for [w; l], when recorded
        if flips and len(sizes) == 2:
            bucket = None if pairs.bucket_of is None else pairs.buckets[int(pairs.bucket_of[keys[0][0]])]
            sizes["crop_top_left" + FLIP] = mirror_crops(
                sizes["original_size"], sizes["crop_top_left"], bucket or pairs.resolution
            )
        for key, value in sizes.items():
            parts[key].append(torch.stack([value[:n], value[n:]], dim=1))  # [B, 2 (w, l), 2]
        captions += b.captions
    return {k: torch.cat(v) for k, v in parts.items()}, captions


@torch.no_grad()
def encode_captions(comps: Any, captions: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """The family's conditions of `captions`, [K, ...] per key, in the text encoders' dtype (`text_conditions`,
    as a training step's `encode`)."""
    from xdpo.data.encode import text_conditions

    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for j in range(0, len(captions), batch_size):
        cond = text_conditions(comps, captions[j : j + batch_size], comps.vae.device)
        for key, value in cond.items():
            parts[key].append(value.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def build_cache(cfg: Config, *, shard_size: int = 256, batch_size: int = 8, accelerator: Any = None) -> Path:
    """Encode the config's pairs and captions into `data.cache` (this process's shards); return the folder."""
    from accelerate import Accelerator

    from xdpo.models.load import check_data_shape, check_pipeline

    if not cfg.data.cache:
        raise ConfigError(
            "data.cache: required by `xdpo cache` (the folder to write), e.g. data.cache=cache/sd15"
        )
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"--shard-size and --batch-size must be >= 1, got {shard_size} and {batch_size}")
    accelerator = accelerator or Accelerator(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    folder = Path(cfg.data.cache)
    fam = check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision)
    table, pairs, n_pairs = open_pairs(cfg, plain=True)
    if n_pairs == 0:
        raise XdpoError(f"data.path: {cfg.data.path} has no usable pairs ({pairs.n_ties} ties dropped)")
    expected = depends(cfg, fam, table, pairs, n_pairs)
    old = read_manifest(folder)
    if old is not None:
        check_manifest(old, cfg, expected, strict=True)
        if old.get("shard_size") != shard_size:
            raise ConfigError(
                f"--shard-size: {folder} was started with --shard-size {old.get('shard_size')}, not {shard_size}"
            )
        if old.get("complete"):
            accelerator.print(f"xdpo cache: {folder} is complete and matches this config; nothing to do")
            return folder
    comps = load_encoders(cfg, fam, accelerator.device)
    check_data_shape(fam, cfg.data, comps.vae)
    layout = shard_layout(
        n_pairs, shard_size, getattr(pairs, "bucket_of", None)
    )  # data.buckets: a bucket per shard
    flips, n_shards = cfg.data.flip != "none", len(layout)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "complete": False,
        "depends": expected,
        "built_with": built_with(cfg),
        "flips": flips,
        "empty_caption": cfg.data.prompt_dropout > 0,
        "shard_size": shard_size,
        "n_pairs": n_pairs,
        "n_ties": pairs.n_ties,
        "n_dropped": pairs.n_dropped,
        "pair_shards": n_shards,
        "dtype": str(comps.vae.dtype).removeprefix("torch."),
        **({"buckets": [list(b) for b in pairs.buckets]} if pairs.bucket_of is not None else {}),
    }
    accelerator.wait_for_everyone()
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob("*.tmp*"):  # half-written shards of a killed run
            leftover.unlink()
        write_manifest(folder, manifest)
    accelerator.wait_for_everyone()

    # ---- images: this process's missing pair shards ----------------------------------------------
    todo = [k for k in range(rank, n_shards, world) if not pair_shard(folder, k).is_file()]
    ranges = {k: layout[k] for k in todo}
    bar = tqdm(total=sum(map(len, ranges.values())), disable=not main, desc="cache images", unit="pair")
    for k, idx in ranges.items():
        keys = [(i, i) for i in idx]  # plain pairs: no dropout or flips, the seed draws nothing
        tensors, captions = encode_pair_shard(comps, pairs, keys, flips, batch_size, cfg.data.num_workers)
        save_shard(pair_shard(folder, k), tensors, {"captions": json.dumps(captions)}, rank)
        bar.update(len(idx))
    bar.close()
    accelerator.wait_for_everyone()

    # ---- captions: the distinct captions of all pair shards (+ ""), this process's missing shards ----
    seen = {c for k in range(n_shards) for c in json.loads(shard_metadata(pair_shard(folder, k))["captions"])}
    captions = sorted(seen | ({""} if manifest["empty_caption"] else set()))
    n_text = math.ceil(len(captions) / shard_size)
    text_todo = [k for k in range(rank, n_text, world) if not text_shard(folder, k).is_file()]
    bar = tqdm(total=len(text_todo) * shard_size, disable=not main, desc="cache captions", unit="caption")
    for k in text_todo:
        chunk = captions[k * shard_size : (k + 1) * shard_size]
        save_shard(
            text_shard(folder, k),
            encode_captions(comps, chunk, batch_size),
            {"captions": json.dumps(chunk)},
            rank,
        )
        bar.update(len(chunk))
    bar.close()
    print(
        f"xdpo cache: process {rank}/{world} encoded {len(todo)} image shard(s) "
        f"({sum(map(len, ranges.values()))} pairs) and {len(text_todo)} caption shard(s)",
        flush=True,
    )
    accelerator.wait_for_everyone()

    if main:
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        manifest.update(complete=True, text_shards=n_text, n_captions=len(captions), bytes=size)
        write_manifest(folder, manifest)
        orient = " (both orientations)" if flips else ""
        print(
            f"xdpo cache: {n_pairs} pairs{orient} and {len(captions)} captions in {folder}: "
            f"{size / 1e9:.3g} GB, {manifest['dtype']}; train with data.cache={folder}",
            flush=True,
        )
    accelerator.wait_for_everyone()
    return folder
