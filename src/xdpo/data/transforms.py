"""Image decoding and training transforms with PIL + numpy (torchvision does not import beside CPU torch).

The pipeline matches torchvision's `Resize(R) -> CenterCrop(R) | RandomCrop(R) -> RandomHorizontalFlip
-> ToTensor -> Normalize([0.5], [0.5])`, with every random draw taken from a numpy Generator so that
a sample is a pure function of (row, seed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC
"""Resize filter. PIL filters antialias when downsampling, like torchvision's Resize on PIL images.
(Diffusion-DPO and diffusers' DPO example use bilinear; the difference is small.)"""

FLIP_MODES = ("none", "pair", "independent")


MIN_IMAGE_SIDE = 8
"""Smallest accepted width and height in pixels: a smaller image is almost surely broken data (a
placeholder, a failed thumbnail), and before resizing it would not fill one latent pixel of the SD VAE
(8x downsampling). See docs/design.md §4, "Bad rows"."""


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image from any PIL mode: CMYK, RGBA / LA (alpha dropped, as Diffusion-DPO's `.convert("RGB")`),
    greyscale, 1-bit, palette (with or without transparency), 16-bit and 32-bit integer or float greyscale.

    16-bit modes (I;16*) are scaled by 1/257 to 8 bits (`convert` would clip them to white); mode I
    is scaled the same way when its values exceed 255, and mode F when its values lie in [0, 1].
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
            arr = arr / 257.0
        elif img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        grey = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def decode_image(value: Any, min_side: int = 0) -> Image.Image:
    """An RGB PIL image from raw bytes, an HF Image dict `{"bytes", "path"}`, a PIL image or a path.

    Raises whatever PIL raises for undecodable data (the caller names row and column), or
    `TypeError`/`ValueError` for a value that holds no image at all or one smaller than `min_side`
    pixels on a side. Any mode is converted to RGB (`to_rgb`).
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise ValueError("empty image value (no bytes, no path)")
        value = data if data is not None else path
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ValueError("empty image bytes")
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        img = Image.open(value)
    elif value is None:
        raise ValueError("missing image (null)")
    else:
        raise TypeError(f"expected image bytes, an Image dict or a PIL image, got {type(value).__name__}")
    if min(img.size) < min_side:  # the header is enough: no need to decode a 1x1 image
        raise ValueError(f"image is {img.width}x{img.height} pixels, smaller than {min_side} on a side")
    img.load()  # decode now so truncated data fails here
    return to_rgb(img)


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


@dataclass(frozen=True)
class Placed:
    """A transformed image and SDXL's size conditions (diffusers' train_text_to_image_sdxl.py).

    `original_size` = (height, width) before resizing; `crop_top_left` = (top, left) of the crop in the
    resized image, with left mirrored (resized width - left - resolution) when the image is flipped.
    """

    pixel: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def _place(img: Image.Image, offsets: tuple[int, int], resolution: int, flip: bool) -> Placed:
    """Crop the resized `img` at `offsets` = (left, top), optionally mirror; record SDXL's sizes."""
    left, top = offsets
    width = img.width
    pixel = to_tensor(crop(img, left, top, resolution), flip)
    return Placed(pixel, (0, 0), (top, width - left - resolution if flip else left))


def place_pair(
    img_w: Image.Image,
    img_l: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    random_crop: bool = False,
    flip: str = "none",
) -> tuple[Placed, Placed]:
    """Resize, crop, flip and normalise both images of a pair, keeping their SDXL size conditions.

    Random crops share their offsets when both resized images have the same size; `flip="pair"`
    mirrors both or neither (p = 0.5), `flip="independent"` tosses one coin per image. Draw order:
    crop offsets (w, then l unless shared), then flips (`xdpo.data.cache_reader.item_choices` relies on it).
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    sizes = [(img.height, img.width) for img in (img_w, img_l)]
    img_w, img_l = resize_shorter(img_w, resolution), resize_shorter(img_l, resolution)
    if random_crop:
        off_w = random_offsets(*img_w.size, resolution, rng)
        off_l = off_w if img_l.size == img_w.size else random_offsets(*img_l.size, resolution, rng)
    else:
        off_w, off_l = center_offsets(*img_w.size, resolution), center_offsets(*img_l.size, resolution)
    flip_w, flip_l = draw_flips(rng, flip)
    placed = _place(img_w, off_w, resolution, flip_w), _place(img_l, off_l, resolution, flip_l)
    return tuple(replace(p, original_size=size) for p, size in zip(placed, sizes, strict=True))  # type: ignore[return-value]


def place_image(
    img: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    random_crop: bool = False,
    flip: bool = False,
) -> Placed:
    """One image: resize, crop (center or random), flip with p = 0.5 when `flip`; SDXL sizes as `place_pair`."""
    size = (img.height, img.width)
    img = resize_shorter(img, resolution)
    offsets = (
        random_offsets(*img.size, resolution, rng) if random_crop else center_offsets(*img.size, resolution)
    )
    mirrored = bool(rng.random() < 0.5) if flip else False
    return replace(_place(img, offsets, resolution, mirrored), original_size=size)


def draw_flips(rng: np.random.Generator, flip: str) -> tuple[bool, bool]:
    """(flip w, flip l): `pair` one draw for both, `independent` one each, `none` no draw."""
    if flip == "pair":
        both = bool(rng.random() < 0.5)
        return both, both
    if flip == "independent":
        return bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    return False, False


def transform_pair(
    img_w: Image.Image,
    img_l: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    random_crop: bool = False,
    flip: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`place_pair`'s two pixel tensors (same draws)."""
    w, lo = place_pair(img_w, img_l, resolution, rng, random_crop=random_crop, flip=flip)
    return w.pixel, lo.pixel


# ---- aspect-ratio buckets (`data.buckets`): a (width, height) target instead of a square -------------


def cover_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) scaled to cover `size` = (W, H): the side that fits tighter equals its target, the
    other is scaled and truncated as torchvision's Resize (a square `size` gives `resized_size`)."""
    target_w, target_h = size
    if width * target_h >= height * target_w:  # wider than the target: fit the height
        return max(target_w, int(target_h * width / height)), target_h
    return target_w, max(target_h, int(target_w * height / width))


def place_pair_in(
    img_w: Image.Image,
    img_l: Image.Image,
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    random_crop: bool = False,
    flip: str = "none",
) -> tuple[Placed, Placed]:
    """`place_pair` into a (width, height) bucket: each image resized to cover it, then cropped to it
    (center or random; shared offsets when both resized images have the same size) and flipped as
    `place_pair` does (same draw order). SDXL's conditions: `original_size` (height, width) before
    resizing, `crop_top_left` (top, left) in the resized image, left mirrored for a flipped image."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    target_w, target_h = size
    sizes = [(img.height, img.width) for img in (img_w, img_l)]
    resized = []
    for img in (img_w, img_l):
        cover = cover_size(img.width, img.height, size)
        resized.append(img if cover == img.size else img.resize(cover, RESAMPLE))
    img_w, img_l = resized

    def offsets(img: Image.Image) -> tuple[int, int]:
        if random_crop:
            return int(rng.integers(0, img.width - target_w + 1)), int(
                rng.integers(0, img.height - target_h + 1)
            )
        return int(round((img.width - target_w) / 2.0)), int(round((img.height - target_h) / 2.0))

    off_w = offsets(img_w)
    off_l = off_w if random_crop and img_l.size == img_w.size else offsets(img_l)
    flips = draw_flips(rng, flip)
    placed = []
    for img, (left, top), mirrored, original in zip(
        (img_w, img_l), (off_w, off_l), flips, sizes, strict=True
    ):
        pixel = to_tensor(img.crop((left, top, left + target_w, top + target_h)), mirrored)
        placed.append(Placed(pixel, original, (top, img.width - left - target_w if mirrored else left)))
    return placed[0], placed[1]
