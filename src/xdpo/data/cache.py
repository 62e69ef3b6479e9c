"""Latent and text-condition cache (`xdpo cache` writes it, `xdpo train` with `data.cache` reads it).

What a cache holds, in `data.cache/`:
- `pairs-NNNNN.safetensors`, pairs [k S, (k + 1) S) of the run's pair index (S = `shard_size`; with
  `data.buckets`, each bucket's pairs in index order cut into shards of S, bucket after bucket, so that a
  shard holds one latent size: `shard_layout`): for
  both images the VAE posterior's parameters `mean_w`, `logvar_w`, `mean_l`, `logvar_l` [P, C, h, w]
  ([P, C, F', h, w] for the clips of a video family; unscaled), so that training still samples z = mean + exp(logvar / 2) eps every step, as
  Diffusion-DPO does; `label_w` [P], `row` [P]; each pair's caption in the metadata; SDXL's
  `original_size` / `crop_top_left` [P, 2 (w, l), 2] when the data path records them (`PreferencePairs`
  does), with the mirrored crop offsets of flipped images as `crop_top_left_flip`.
- `text-NNNNN.safetensors`: the family's conditions (`family.encode_text`) of each distinct caption,
  sorted, plus the empty caption "" when `data.prompt_dropout` > 0; the captions in the metadata.
- `manifest.json`: what the cache depends on (model files, VAE, family, resolution, flips, data and its
  row and pair counts, ties, max_pairs, on_bad_row, the family's text settings) and what it holds.

Precision: the dtype the VAE and text encoders compute in during training (`train.mixed_precision`,
fp32 for an upcast VAE), i.e. exactly the values an uncached run would compute and no more: fp32 for
fp32 runs, half the disk (fp16 / bf16) for mixed-precision runs, whose uncached latents are no finer.

Flips: both orientations are encoded (`mean_w_flip`, ...: 2x the latent disk) when `data.flip` is not
none. A flip cannot be replayed on the latent: for the digits base VAE the posterior mean of a flipped
image differs from the flipped mean by 67% (relative L2; 36x the posterior's own noise, 0.77x the
distance between two different digits), for an SD 1.5-shaped VAE by 66% (benchmarks/cache_flip.py).
Random crops (`data.random_crop`) cannot be cached and are refused.

An item's random choices (prompt dropout, flips) are the same pure function of its (index, seed) key
as in `PreferencePairs`, so a cached run reads what an uncached run would (in fp32 up to float
rounding: tested).
A run checks the manifest against its config (`check_manifest`) and refuses a mismatch with one line.
Reading a cache during training: `xdpo.data.cache_reader`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from xdpo.config import renamed_keys
from xdpo.errors import ConfigError, DataError

FORMAT = 1
MANIFEST = "manifest.json"
LATENT_KEYS = ("mean_w", "logvar_w", "mean_l", "logvar_l")
IMAGE_SIZE_KEYS = ("original_size", "crop_top_left")
"""SDXL's per-image size conditions: batch keys [2B, 2] for [w; l], stored [P, 2, 2] (w, l)."""
FLIP = "_flip"
HASHED_BYTES = 16 << 20
"""Files up to this size are fingerprinted by content (configs, tokenizers), larger ones by size."""


def shard_layout(n_pairs: int, shard_size: int, bucket_of: Any = None) -> list[list[int]]:
    """The pair indices of each pair shard: [k S, (k + 1) S) without buckets; with buckets (`bucket_of[i]`:
    pair i's bucket), each bucket's pairs in index order cut into shards of S, bucket after bucket."""
    if bucket_of is None:
        return [list(range(k, min(n_pairs, k + shard_size))) for k in range(0, n_pairs, shard_size)]
    import numpy as np

    out = []
    for b in np.unique(bucket_of):
        members = np.flatnonzero(np.asarray(bucket_of) == b).tolist()
        out += [members[k : k + shard_size] for k in range(0, len(members), shard_size)]
    return out


def pair_shard(folder: Path, k: int) -> Path:
    return Path(folder) / f"pairs-{k:05d}.safetensors"


def text_shard(folder: Path, k: int) -> Path:
    return Path(folder) / f"text-{k:05d}.safetensors"


def shard_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - missing, truncated or foreign: all mean "not a shard"
        raise DataError(f"data.cache: cannot read shard {path} ({e}); run `xdpo cache` again") from None


def save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], rank: int = 0) -> None:
    """Write to a temporary name, then rename: a killed run never leaves a half-written shard."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp{rank}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.cache: {path} is not readable JSON ({e})") from None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, Path(folder) / MANIFEST)


# ----------------------------------------------------------------------------------------------- identity


def open_pairs(cfg: Any, *, plain: bool = False) -> tuple[Any, Any, int]:
    """(table, PreferencePairs, usable pairs) exactly as a training run opens them
    (`xdpo.data.open_pair_data`); `plain`: without prompt dropout and flips (what the cache encodes)."""
    from xdpo.data import open_pair_data

    d = cfg.data
    if d.cache and getattr(d, "format", "pairs") != "pairs":
        raise ConfigError(
            f"data.cache: caches preference pairs only (data.format=pairs), not data.format={d.format}"
        )
    return open_pair_data(cfg, plain=plain)


def _resolved(name: str) -> str:
    from xdpo.models.load import resolve_pretrained

    path = Path(resolve_pretrained(name)).expanduser()
    return str(path.resolve()) if path.exists() else name


def _local(name: str, revision: str | None) -> Path | None:
    """The folder of a pipeline or model: local, or the hub cache's snapshot (offline)."""
    path = Path(_resolved(name))
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: the name and revision are the identity
        return None


def fingerprint(root: Path | None, names: Iterable[str]) -> str:
    """sha256 over the files under root/name (content up to HASHED_BYTES, else size); '' without a root."""
    if root is None:
        return ""
    h = hashlib.sha256()
    for name in sorted(names):
        base = root / name
        files = sorted(base.rglob("*")) if base.is_dir() else [base]
        for f in files:
            rel = f.relative_to(root)
            if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            size = f.stat().st_size
            h.update(f"{rel.as_posix()}\0{size}\0".encode())
            if size <= HASHED_BYTES:
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:20]


def text_components(cfg: Any) -> tuple[str, ...]:
    """The pipeline's text encoders and tokenizers (what a cached run does not load)."""
    from xdpo.models.load import read_model_index

    index = read_model_index(cfg.model.pretrained, cfg.model.revision)
    return tuple(k for k in index if k.startswith(("text_encoder", "tokenizer")))


def depends(cfg: Any, fam: Any, table: Any, pairs: Any, n_pairs: int) -> dict[str, Any]:
    """What a cache's contents depend on, keyed by config key (compared one by one, in this order)."""
    m, d = cfg.model, cfg.data
    root = _local(m.pretrained, m.revision)
    parts = ["vae", *text_components(cfg), f"{fam.denoiser}/config.json"]
    out: dict[str, Any] = {
        "model.pretrained": _resolved(m.pretrained),
        "model.revision": m.revision,
        "model.family": fam.name,
        "model.pretrained files": fingerprint(root, parts),
        "model.vae": _resolved(m.vae) if m.vae else "",
        "model.vae files": fingerprint(_local(m.vae, None), ["."]) if m.vae else "",
    }
    out.update(fam.cache_keys(cfg.family))  # the family's knobs its text conditions depend on
    out.update(
        {
            "data.path": _resolved(d.path),
            "data.split": d.split,
            **{f"data.{k}": getattr(d, k) for k in ("format", "columns", "streaming") if hasattr(d, k)},
            # clips (video families): only then, so that image caches written before these keys still match
            **({"data.num_frames": d.num_frames, "data.fps": d.fps} if getattr(d, "num_frames", 0) else {}),
            "data.resolution": d.resolution,
            "data.ties": d.ties,
            "data.max_pairs": d.max_pairs,
            "data.on_bad_row": d.on_bad_row,
            "rows": len(table),
            "pairs": n_pairs,
        }
    )
    if getattr(d, "buckets", None):  # which bucket each pair is cached in (a digest of the assignment)
        out["data.buckets"] = [f"{w}x{h}" for w, h in pairs.buckets]
        out["pair buckets"] = hashlib.sha256(bytes(memoryview(pairs.bucket_of.astype("int64")))).hexdigest()[
            :20
        ]
    return out


def built_with(cfg: Any) -> dict[str, Any]:
    """Settings a cache may hold more than a run needs (flips, the empty caption), and its precision."""
    return {
        "data.flip": cfg.data.flip,
        "data.prompt_dropout": cfg.data.prompt_dropout,
        "train.mixed_precision": cfg.train.mixed_precision,
    }


def check_manifest(
    manifest: dict[str, Any], cfg: Any, expected: dict[str, Any], *, strict: bool = False
) -> None:
    """Refuse a cache built for other settings with one line naming the first difference.

    A run accepts a cache holding more than it needs (both flip orientations, the empty caption, any
    precision); `strict` (re-running `xdpo cache` on the folder) wants the same settings."""
    folder = cfg.data.cache
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"data.cache: {folder} has cache format {manifest.get('format')}, not {FORMAT}; rebuild it"
        )
    cached = manifest.get("depends", {})
    formerly = {new: old for old, new in renamed_keys().items()}  # caches written before a key moved
    for key, value in expected.items():
        old = cached[key] if key in cached else cached.get(formerly.get(key, key))
        if old == value:
            continue
        if key in ("rows", "pairs"):
            what = "rows" if key == "rows" else "usable pairs"
            raise ConfigError(
                f"data.cache: {folder} was built for {old} {what} of data.path={cfg.data.path}, "
                f"which now gives {value}"
            )
        if key.endswith(" files"):
            name = key.split()[0]
            raise ConfigError(
                f"data.cache: {folder} was built from other files of {name}={getattr(cfg.model, name.split('.')[1])} "
                "(its VAE, text encoders, tokenizers or config differ)"
            )
        raise ConfigError(f"data.cache: {folder} was built for {key}={old}, the config says {value}")
    was, now = manifest.get("built_with", {}), built_with(cfg)
    if strict:
        for key, value in now.items():
            if was.get(key) != value:
                raise ConfigError(
                    f"data.cache: {folder} holds a cache built with {key}={was.get(key)}, the config says {value}; "
                    "choose another data.cache folder or delete this one"
                )
        return
    if cfg.data.flip != "none" and not manifest.get("flips"):
        raise ConfigError(
            f"data.cache: {folder} was built for data.flip=none (one orientation cached), "
            f"the config says {cfg.data.flip}"
        )
    if cfg.data.prompt_dropout > 0 and not manifest.get("empty_caption"):
        raise ConfigError(
            f"data.cache: {folder} was built for data.prompt_dropout=0 (no empty-caption conditions cached), "
            f"the config says {cfg.data.prompt_dropout:g}"
        )


# ----------------------------------------------------------------------------------------------- reading
