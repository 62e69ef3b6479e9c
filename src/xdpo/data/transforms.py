"""Image decoding and training transforms with PIL + numpy (torchvision does not import beside CPU torch).

The pipeline matches torchvision's `Resize(R) -> CenterCrop(R) | RandomCrop(R) -> RandomHorizontalFlip
-> ToTensor -> Normalize([0.5], [0.5])`, with every random draw taken from a numpy Generator so that
a sample is a pure function of (row, seed).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC
"""Resize filter. PIL filters antialias when downsampling, like torchvision's Resize on PIL images.
(Diffusion-DPO and diffusers' DPO example use bilinear; the difference is small.)"""

FLIP_MODES = ("none", "pair", "independent")


def decode_image(value: Any) -> Image.Image:
    """An RGB PIL image from raw bytes, an HF Image dict `{"bytes", "path"}`, a PIL image or a path.

    Raises whatever PIL raises for undecodable data (the caller names row and column), or
    `TypeError`/`ValueError` for a value that holds no image at all.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise ValueError("empty image value (no bytes, no path)")
        value = data if data is not None else path
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        img = Image.open(value)
    elif value is None:
        raise ValueError("missing image (null)")
    else:
        raise TypeError(f"expected image bytes, an Image dict or a PIL image, got {type(value).__name__}")
    img.load()  # decode now so truncated data fails here
    return img if img.mode == "RGB" else img.convert("RGB")


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side = `resolution`, the longer scaled and truncated as torchvision."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def resize_shorter(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so that the shorter side equals `resolution` (no-op when it already does)."""
    size = resized_size(*img.size, resolution)
    return img if size == img.size else img.resize(size, RESAMPLE)


def center_offsets(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(left, top) of a centered `resolution` square, rounded as torchvision's CenterCrop."""
    return int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))


def random_offsets(width: int, height: int, resolution: int, rng: np.random.Generator) -> tuple[int, int]:
    """(left, top) of a uniformly placed `resolution` square."""
    return int(rng.integers(0, width - resolution + 1)), int(rng.integers(0, height - resolution + 1))


def crop(img: Image.Image, left: int, top: int, resolution: int) -> Image.Image:
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """float32 [3, H, W] in [-1, 1] from an RGB image: (x / 255 - 0.5) / 0.5, optionally mirrored."""
    arr = np.asarray(img, dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    arr = arr.transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr))


def transform_pair(
    img_w: Image.Image,
    img_l: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    random_crop: bool = False,
    flip: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, crop, flip and normalise both images of a pair.

    Random crops share their offsets when both resized images have the same size; `flip="pair"`
    mirrors both or neither (p = 0.5), `flip="independent"` tosses one coin per image.
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    img_w, img_l = resize_shorter(img_w, resolution), resize_shorter(img_l, resolution)
    if random_crop:
        off_w = random_offsets(*img_w.size, resolution, rng)
        off_l = off_w if img_l.size == img_w.size else random_offsets(*img_l.size, resolution, rng)
    else:
        off_w, off_l = center_offsets(*img_w.size, resolution), center_offsets(*img_l.size, resolution)
    img_w, img_l = crop(img_w, *off_w, resolution), crop(img_l, *off_l, resolution)
    if flip == "pair":
        flip_w = flip_l = bool(rng.random() < 0.5)
    elif flip == "independent":
        flip_w, flip_l = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    else:
        flip_w = flip_l = False
    return to_tensor(img_w, flip_w), to_tensor(img_l, flip_l)
