"""`Batch`: the one form every data source's collate gives the training step (docs/design.md §2).

Images are laid out as pairs [w_1..w_B; l_1..l_B] (`pairs=True`, N = 2B images, B groups) or as
independent images (`pairs=False`, N = B). Each batch holds its images either as pixels (decoded and
transformed rows), as cached VAE posterior parameters, or as latents already in the denoiser's space (a
rollout's clean samples), and its text either as captions to encode or as cached conditions;
`xdpo.data.encode.encode` turns any of them into latents and conditions. Rollout batches carry their
per-image values (advantage, group, training timestep) in `extras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    captions: list[str]  # one per group (pair or image)
    label: (
        Tensor  # [B] float32: P(w preferred) for pairs (1, or 0.5 for a kept tie); 1/0 desirable for images
    )
    pairs: bool
    pixel_size: tuple[int, int]  # (height, width) of the images in pixels
    pixels: Tensor | None = None  # [N, 3, H, W] in [-1, 1]
    posterior: tuple[Tensor, Tensor] | None = None  # cached (mean, logvar) [N, C, h, w], unscaled
    cond: dict[str, Tensor] | None = None  # cached text conditions [B, ...]
    latents: Tensor | None = None  # [N, C, h, w] scaled latents (rollouts: the sampler's clean latents)
    extras: dict[str, Tensor] = field(default_factory=dict)  # rollouts: per image advantage, group, timestep
    sizes: dict[str, Tensor] = field(default_factory=dict)  # SDXL: original_size, crop_top_left [N, 2]
    rows: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [B] table rows
    skipped_rows: list[int] = field(default_factory=list)  # rows passed over (undecodable, on_bad_row=skip)

    @property
    def groups(self) -> int:
        return len(self.captions)

    @property
    def images(self) -> int:
        return 2 * self.groups if self.pairs else self.groups
