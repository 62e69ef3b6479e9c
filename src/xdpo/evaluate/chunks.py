"""Finished sampling work kept on disk, so that an interrupted sampler resumes inside its work: `generate`'s
batches (`BatchChunks`) and `sample_images`' whole batches (`finished_batches`, read from its temporary
manifest). Both resume at a batch boundary, so the batches, and the images, are those of an uninterrupted
call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class BatchChunks:
    """`generate`'s finished batches on disk: `batch-<first index>/NNNNN.png`, valid for one set of inputs
    (`key.json`: a digest of the prompts, latents, steps, guidance, batch size and the pipeline's scheduler)."""

    def __init__(
        self, folder: str | Path, pipe: Any, prompts: list[str], latents: Any, *settings: Any
    ) -> None:
        import hashlib
        import shutil

        self.folder = Path(folder)
        h = hashlib.sha256(json.dumps([prompts, [str(x) for x in settings]]).encode())
        h.update(latents.float().numpy().tobytes())
        h.update(json.dumps({k: str(v) for k, v in pipe.scheduler.config.items()}, sort_keys=True).encode())
        key = {"inputs": h.hexdigest()[:24], "scheduler": type(pipe.scheduler).__name__}
        index = self.folder / "key.json"
        if index.is_file() and json.loads(index.read_text()) != key:
            shutil.rmtree(self.folder)  # another set of inputs: nothing to reuse
        self.folder.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps(key))
        self.batch_size = int(settings[2])

    def read(self, first: int) -> list[Any] | None:
        from PIL import Image

        folder = self.folder / f"batch-{first:06d}"
        if not (folder / "done").is_file():
            return None
        return [Image.open(f).convert("RGB") for f in sorted(folder.glob("*.png"))]

    def write(self, first: int, images: list[Any]) -> None:
        folder = self.folder / f"batch-{first:06d}"
        folder.mkdir(exist_ok=True)
        for k, image in enumerate(images):
            image.save(folder / f"{first + k:06d}.png")
        (folder / "done").touch()  # last: a batch killed while saving is sampled again


def finished_batches(
    out: Path, tmp: Path, settings: dict[str, Any], jobs: list[tuple[dict, int]], batch_size: int
) -> list[str]:
    """The manifest lines of the whole batches an interrupted `sample_images` wrote with the same settings
    and jobs (their images present), [] when there are none."""
    if not tmp.is_file():
        return []
    lines = [x for x in tmp.read_text(encoding="utf-8").splitlines(keepends=True) if x.endswith("\n")]
    lines = lines[: len(lines) // batch_size * batch_size]
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return []
        rec, seed = jobs[k] if k < len(jobs) else ({}, None)
        same = all(row.get(key) == value for key, value in settings.items())
        if not same or row.get("prompt") != rec.get("prompt") or row.get("seed") != seed:
            return []
        if not (out / row["file"]).is_file():
            return []
    return lines
