"""Video clips for video families (Wan): decoding, frame sampling, placement, and writing mp4 files.

A clip value is a video file's bytes (mp4, webm, mov, mkv: anything FFmpeg reads) or its path, a folder
of frame images (read in name order), or a list of encoded frames. Videos are decoded with PyAV (the
`video` extra: `pip install 'xdpo[video]'`).

Frame sampling: `num_frames` frames at `fps` per second of the video's own timestamps, starting with its
first frame: frame i is the last frame shown at time i / fps (a video at 30 fps sampled at 16 fps skips
about every other frame). `fps` = 0 takes consecutive frames, as does every frame folder or frame list
(they carry no timestamps). A clip shorter than that holds its last frame to `num_frames` frames (a still
end: a 2-frame clip read at 5 frames repeats its second frame three times).

Placement: every frame of a clip is resized, cropped and flipped as the first one, with the draws of
`transforms.place_pair` (crops, then flips), so a clip pair's random choices are those of an image pair.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xdpo.data.transforms import (
    FLIP_MODES,
    Placed,
    _place,
    center_offsets,
    decode_image,
    draw_flips,
    random_offsets,
    resize_shorter,
)
from xdpo.errors import XdpoError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_EXPECTED = "a video (mp4/webm bytes or file), a folder of frames or a list of frames"


def require_av() -> Any:
    """The `av` module (PyAV), or one line saying how to install it."""
    try:
        import av
    except ImportError:
        raise XdpoError("videos are read and written with PyAV: pip install 'xdpo[video]' (or av)") from None
    return av


def frame_times(num_frames: int, fps: float) -> list[float]:
    """The sampling times i / fps, i < num_frames (seconds after the first frame)."""
    return [i / fps for i in range(num_frames)]


def _video_frames(source: bytes | Path, num_frames: int, fps: float) -> list[Image.Image]:
    """`num_frames` frames of a video sampled at `fps` (0: consecutive), decoding only as far as needed."""
    av = require_av()
    container = av.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source))
    try:
        stream = container.streams.video[0]
        targets = frame_times(num_frames, fps) if fps > 0 else None
        picked: list[Image.Image] = []
        start, last = None, None
        for frame in container.decode(stream):
            image = frame.to_image()
            if targets is None:
                picked.append(image)
                if len(picked) == num_frames:
                    break
                continue
            t = float(frame.time if frame.time is not None else len(picked) / fps)
            start = t if start is None else start
            while len(picked) < num_frames and targets[len(picked)] < t - start - 1e-6:
                picked.append(last)  # the frame shown at that time: the last one before this frame
            if len(picked) == num_frames:
                break
            last = image
        if targets is not None and last is not None and len(picked) < num_frames:
            picked.append(last)
    finally:
        container.close()
    if not picked:
        raise ValueError("video without frames")
    return picked


def _folder_frames(folder: Path, num_frames: int) -> list[Image.Image]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"frame folder {folder} holds no {'/'.join(FRAME_SUFFIXES)} images")
    return [decode_image(p) for p in files[:num_frames]]


def decode_clip(source: Any, num_frames: int, fps: float = 0.0, min_side: int = 0) -> list[Image.Image]:
    """`num_frames` RGB frames of a clip (module docstring): video bytes or file, frame folder, frame list.

    Raises what decoding raises, or ValueError for a clip without frames or smaller than `min_side`."""
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        source = data if data is not None else path
    if isinstance(source, memoryview):
        source = bytes(source)
    if source is None or (isinstance(source, bytes | bytearray | str) and len(source) == 0):
        raise ValueError("missing clip (empty)")
    if isinstance(source, list | tuple):
        frames = [decode_image(f) for f in source[:num_frames]]
    elif isinstance(source, str | Path) and Path(source).is_dir():
        frames = _folder_frames(Path(source), num_frames)
    elif isinstance(source, bytes | bytearray | str | Path):
        frames = [f.convert("RGB") for f in _video_frames(source, num_frames, fps)]
    else:
        raise TypeError(f"expected {CLIP_EXPECTED}, got {type(source).__name__}")
    if not frames:
        raise ValueError("clip without frames")
    if min(frames[0].size) < min_side:
        w, h = frames[0].size
        raise ValueError(f"frames are {w}x{h} pixels, smaller than {min_side} on a side")
    return frames + [frames[-1]] * (num_frames - len(frames))  # a short clip holds its last frame


def _place_clip(
    frames: Sequence[Image.Image], offsets: tuple[int, int], resolution: int, flip: bool
) -> Placed:
    placed = [_place(f, offsets, resolution, flip) for f in frames]
    return replace(placed[0], pixel=torch.stack([p.pixel for p in placed], dim=1))  # [3, F, R, R]


def place_clip_pair(
    clip_w: Sequence[Image.Image],
    clip_l: Sequence[Image.Image],
    resolution: int,
    rng: np.random.Generator,
    *,
    random_crop: bool = False,
    flip: str = "none",
) -> tuple[Placed, Placed]:
    """Resize, crop, flip and normalise both clips of a pair, frame by frame as their first frames, with
    `place_pair`'s draws (crops then flips); pixels [3, F, R, R] in [-1, 1]."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    sizes = [(c[0].height, c[0].width) for c in (clip_w, clip_l)]
    clip_w = [resize_shorter(f, resolution) for f in clip_w]
    clip_l = [resize_shorter(f, resolution) for f in clip_l]
    first_w, first_l = clip_w[0], clip_l[0]
    if random_crop:
        off_w = random_offsets(*first_w.size, resolution, rng)
        off_l = off_w if first_l.size == first_w.size else random_offsets(*first_l.size, resolution, rng)
    else:
        off_w, off_l = center_offsets(*first_w.size, resolution), center_offsets(*first_l.size, resolution)
    flip_w, flip_l = draw_flips(rng, flip)
    placed = _place_clip(clip_w, off_w, resolution, flip_w), _place_clip(clip_l, off_l, resolution, flip_l)
    return tuple(replace(p, original_size=s) for p, s in zip(placed, sizes, strict=True))  # type: ignore[return-value]


def write_video(frames: Sequence[Any], path: str | Path, fps: float, *, crf: int = 18) -> Path:
    """Write RGB frames (PIL images or uint8 / [0, 1] float arrays [H, W, 3]) as an H.264 mp4 (yuv420p;
    odd sides are padded by one pixel, as the codec needs even ones)."""
    av = require_av()
    arrays = [np.asarray(f) for f in frames]
    arrays = [np.round(a * 255).clip(0, 255).astype(np.uint8) if a.dtype != np.uint8 else a for a in arrays]
    h, w = arrays[0].shape[:2]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = max(int(round(fps)), 1)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.options = {"crf": str(crf)}
        for a in arrays:
            a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def frame_strip(frames: Sequence[Any], max_frames: int = 8) -> Image.Image:
    """Up to `max_frames` frames, evenly spaced, side by side in one image (for reports)."""
    arrays = [np.asarray(f) for f in frames]
    arrays = [np.round(a * 255).clip(0, 255).astype(np.uint8) if a.dtype != np.uint8 else a for a in arrays]
    pick = np.unique(np.linspace(0, len(arrays) - 1, min(max_frames, len(arrays))).round().astype(int))
    return Image.fromarray(np.concatenate([arrays[i] for i in pick], axis=1))
