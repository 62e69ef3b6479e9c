"""Can a horizontal flip be replayed on a cached latent? Encode flipped images vs flip the latents.

A random pixel-space flip (`data.flip`) cannot be replayed from one cached latent unless the VAE
encoder is mirror-equivariant: mean(E(flip x)) == flip(mean(E(x))). This measures, for the posterior
mean, the relative error ||mean(E(flip x)) - flip(mean(E(x)))|| / ||mean(E(flip x))|| per image, and,
as a yardstick, the posterior's own noise ||std|| / ||mean|| (what sampling the posterior adds anyway)
and the distance between two different images' latents (what "a different training image" costs).
Two VAEs: the digits base's (trained; `model.pretrained: digits`) on real digits, and an AutoencoderKL
with SD 1.5's vae config and random weights on smooth random textures.

    python benchmarks/cache_flip.py [--n 32] [--sd-size 128] [--threads 1]

The result decides `xdpo cache`'s flip policy (src/xdpo/data/cache.py): both orientations are cached.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
"""runwayml/stable-diffusion-v1-5 vae/config.json (the architecture keys)."""


def textures(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random RGB textures in [-1, 1], [n, 3, size, size] (as the tests' pairs)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 255, size=(max(size // 6, 2), max(size // 6, 2), 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
    return torch.from_numpy(np.stack(out))


def digits(n: int, size: int = 32) -> torch.Tensor:
    """Real handwritten digits (black on white, grey as RGB) in [-1, 1], [n, 3, size, size]."""
    from xdpo.apps.digits.data import load_digit_images

    grey, _ = load_digit_images(size)
    idx = np.random.default_rng(0).choice(len(grey), n, replace=False)
    x = torch.from_numpy(grey[idx].astype(np.float32) / 127.5 - 1)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def measure(vae, x: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Median over images of the flip error, the posterior noise and the between-image distance (relative)."""
    from xdpo.models.load import latent_params

    flip_err, noise, between = [], [], []
    for i in range(0, x.shape[0], batch):
        xs = x[i : i + batch]
        mean, logvar = latent_params(vae, xs)
        mean_f, _ = latent_params(vae, xs.flip(-1))
        norm = mean_f.flatten(1).norm(dim=1)
        flip_err += ((mean_f - mean.flip(-1)).flatten(1).norm(dim=1) / norm).tolist()
        noise += ((0.5 * logvar).exp().flatten(1).norm(dim=1) / mean.flatten(1).norm(dim=1)).tolist()
        other = mean.roll(1, dims=0)
        between += ((mean - other).flatten(1).norm(dim=1) / mean.flatten(1).norm(dim=1)).tolist()
    return {k: float(np.median(v)) for k, v in (("flip", flip_err), ("noise", noise), ("between", between))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per VAE")
    ap.add_argument("--sd-size", type=int, default=128, help="image side for the SD 1.5-shaped VAE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    from xdpo.apps.digits import base_model_path

    rows = []
    vae = AutoencoderKL.from_pretrained(base_model_path(), subfolder="vae").eval()
    rows.append(("digits base VAE (trained), real digits 32 px", measure(vae, digits(args.n))))
    rows.append(("digits base VAE (trained), textures 32 px", measure(vae, textures(args.n, 32))))
    torch.manual_seed(0)
    sd = AutoencoderKL(**SD15_VAE).eval()
    rows.append(
        (
            f"SD1.5-shaped VAE (random), textures {args.sd_size} px",
            measure(sd, textures(args.n, args.sd_size)),
        )
    )
    print("relative L2 error of the posterior mean, median over images:")
    print(
        "  flip     = |mean(E(flip x)) - flip(mean(E(x)))| / |mean(E(flip x))|   (latent flip vs pixel flip)"
    )
    print("  noise    = |std| / |mean|   (the posterior sampling noise, for scale)")
    print("  between  = |mean(E(x)) - mean(E(y))| / |mean(E(x))|   (two different images, for scale)")
    for name, r in rows:
        print(
            f"{name:<50} flip {r['flip']:.4f}   noise {r['noise']:.4f}   between {r['between']:.4f}   "
            f"flip/noise {r['flip'] / r['noise']:.1f}x   flip/between {r['flip'] / r['between']:.2f}"
        )


if __name__ == "__main__":
    main()
