"""Cached over uncached training-step time: what `data.cache` saves (image decoding, VAE, text encoder).

Two models: the digits base (`model.pretrained=digits`, 32 px, full fine-tune) and an SD 1.5-shaped
pipeline with random weights (SD 1.5's UNet and VAE configs; only the text encoder shrunk to one CLIP
layer of width 768, which understates the uncached cost) at 128 and 256 px, where the VAE's share grows
(LoRA rank 4: no second UNet copy in memory; the reference is the same UNet with adapters off).
Times are the median `step_time` of metrics.jsonl after the first (warm-up) step; the cache is built
once per size (`xdpo cache`, timed too). Prints uncached / cached ratios.

    python benchmarks/cache_speedup.py [--threads 1] [--sd-steps 3] [--sd-sizes 128,256] [--digits-steps 12]

Run it alone on the machine (a second busy process distorts CPU timings badly).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
"""runwayml/stable-diffusion-v1-5 unet/config.json (the architecture keys)."""


def build_sd15_shaped(out: Path, unet: dict | None = None) -> Path:
    """SD 1.5's UNet and VAE with random weights, the real CLIP tokenizer, a 1-layer CLIP text encoder.
    `unet`: keys of the UNet config to change (e.g. a narrower `block_out_channels`)."""
    from cache_flip import SD15_VAE  # benchmarks/cache_flip.py (this script's folder is on sys.path)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from xdpo.models.small import components
    from xdpo.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    text = components.clip_text_encoder(hidden_size=768, intermediate_size=3072, heads=12, layers=1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=text,
        tokenizer=tok,
        unet=UNet2DConditionModel(**{**SD15_UNET, **(unet or {})}),
        scheduler=components.ddpm_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def make_pairs(path: Path, n: int, size: int) -> Path:
    """n pairs of random textures at `size` px (PNG), alternating labels."""
    from PIL import Image

    from xdpo.data import write_pairs_parquet

    rng = np.random.default_rng(0)

    def img() -> Image.Image:
        coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)

    caps = [f"a picture of thing number {i}" for i in range(n)]
    labels = [float(i % 2) for i in range(n)]
    return write_pairs_parquet(path, caps, [img() for _ in range(n)], [img() for _ in range(n)], labels)


def step_time(overrides: list[str], out: Path, cache: Path | None) -> float:
    from xdpo.config import load_config
    from xdpo.train.recipe import train

    extra = [f"output_dir={out}"] + ([f"data.cache={cache}"] if cache else [])
    train(load_config(None, overrides + extra))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return float(np.median([r["step_time"] for r in rows]))


def compare(name: str, overrides: list[str], tmp: Path) -> tuple[str, float, float, float]:
    """(name, uncached s/step, cached s/step, cache build s) for one configuration."""
    from xdpo.config import load_config
    from xdpo.train.cache_cli import build_cache

    slug = "".join(c if c.isalnum() else "-" for c in name)
    cache = tmp / f"cache-{slug}"
    t0 = time.perf_counter()
    build_cache(load_config(None, overrides + [f"data.cache={cache}"]))
    built = time.perf_counter() - t0
    plain = step_time(overrides, tmp / f"plain-{slug}", None)
    cached = step_time(overrides, tmp / f"cached-{slug}", cache)
    return name, plain, cached, built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--digits-steps", type=int, default=12)
    ap.add_argument("--sd-steps", type=int, default=3)
    ap.add_argument("--sd-sizes", default="128,256")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = [
        "train.scale_lr=false",
        "train.warmup_steps=0",
        "train.checkpoint_every=0",
        "train.learning_rate=1e-6",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="xdpo-cache-bench-") as name:
        tmp = Path(name)
        data = make_pairs(tmp / "digits.parquet", 64, 32)
        digits = ["model.pretrained=digits", f"data.path={data}", "data.resolution=32", "train.batch_size=8"]
        rows.append(
            compare(
                "digits base, 32 px, batch 8, full",
                digits + common + [f"train.max_steps={args.digits_steps}"],
                tmp,
            )
        )
        sd = build_sd15_shaped(tmp / "sd15")
        for size in [int(s) for s in args.sd_sizes.split(",")]:
            data = make_pairs(tmp / f"sd-{size}.parquet", 8, size)
            over = [
                f"model.pretrained={sd}",
                f"data.path={data}",
                f"data.resolution={size}",
                "train.batch_size=1",
                f"data.max_pairs={args.sd_steps}",  # cache only the pairs the run reads
            ]
            over += ["model.lora_rank=4", f"train.max_steps={args.sd_steps}", *common]
            rows.append(compare(f"SD1.5-shaped, {size} px, batch 1, LoRA", over, tmp))
    print(f"\nthreads={args.threads}; median step time after the first step")
    print(f"{'model':<40} {'uncached':>10} {'cached':>10} {'ratio':>7}   cache build")
    for name, plain, cached, built in rows:
        print(f"{name:<40} {plain:9.3f}s {cached:9.3f}s {plain / cached:6.2f}x   {built:.1f}s")


if __name__ == "__main__":
    main()
