"""Scores from a person: a labelling file written for the images of a round and read back (`online.labels`).

D3PO's human-feedback setting (Yang et al., CVPR 2024, Sec. 5.2) labels the model's own samples; here the
round's images are scored by a JSON file instead of a scorer:

    {"images": {"<key>": {"prompt": "...", "file": "<key>.png", "label": null}, ...}}

`key` is a hash of the image's pixels and its prompt. Scoring a round whose images are not all labelled
writes the missing ones (PNGs into the folder `<file stem>-images/` beside the file, entries with
`"label": null`) and stops the run with one line: fill in a number per image (higher = preferred; D3PO
trains on each prompt's best versus worst, the other objectives on the group advantages of these numbers)
and rerun the same command with `train.resume_from=latest`. A round is sampled again identically from the
same weights and seeds, so the rerun finds its images' labels. One process only (the file is not shared
between processes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from xdpo.errors import XdpoError


def image_key(image: object, prompt: str) -> str:
    """sha1 of the RGB pixels, their size and the prompt (16 hex digits)."""
    rgb = image.convert("RGB")
    h = hashlib.sha1(np.asarray(rgb).tobytes() + repr(rgb.size).encode() + prompt.encode())
    return h.hexdigest()[:16]


class HumanLabels:
    """A reward f(images, prompts) read from the labelling file `path` (module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.__name__ = f"labels:{self.path.name}"

    def read(self) -> dict:
        if not self.path.is_file():
            return {"images": {}}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise XdpoError(f"online.labels: {self.path} is not valid JSON ({e})") from None

    def __call__(self, images: list, prompts: list[str]) -> np.ndarray:
        data = self.read()
        entries = data.setdefault("images", {})
        keys = [image_key(im, p) for im, p in zip(images, prompts, strict=True)]
        missing = [(k, im, p) for k, im, p in zip(keys, images, prompts, strict=True)
                   if entries.get(k, {}).get("label") is None]  # fmt: skip
        if missing:
            folder = self.path.with_name(self.path.stem + "-images")
            folder.mkdir(parents=True, exist_ok=True)
            for k, im, p in missing:
                im.save(folder / f"{k}.png")
                entries[k] = {"prompt": p, "file": f"{folder.name}/{k}.png", "label": None}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
            raise XdpoError(
                f"online.labels: {len(missing)} images await labels in {self.path} (their PNGs in {folder}): set "
                'each null "label" to a number (higher = preferred) and rerun with train.resume_from=latest'
            )
        try:
            return np.array([float(entries[k]["label"]) for k in keys], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise XdpoError(f"online.labels: {self.path}: a label is not a number ({e})") from None
