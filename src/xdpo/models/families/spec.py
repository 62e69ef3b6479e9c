"""The `Family` record: how a diffusers pipeline of one family is trained (see `families/__init__.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    class_names: tuple[str, ...]
    denoiser: str
    process: str
    load_kwargs: Callable[[Any], dict[str, Any]]
    encode_text: Callable[..., dict[str, Any]]
    image_conditions: Callable[..., dict[str, Any]]
    predict: Callable[..., Any]
    about: str = ""
    embeddings: tuple[str, ...] = ()
    """Condition keys holding float embeddings, cast to a half-precision reference's dtype; every other
    condition (SDXL's size ids, Flux's guidance) reaches every model as it is, never rounded."""
    latent_multiple: int = 1
    """The latent side must be a multiple of this (the denoiser's patch: SD3's patch embedding, Flux's 2 x 2
    packing); a resolution check kept minimal here, for the family traits to absorb."""

    def check_resolution(self, resolution: int, vae_scale: int) -> None:
        """One line naming `data.resolution` when it is not a multiple of vae_scale * latent_multiple."""
        from xdpo.errors import ConfigError

        multiple = vae_scale * self.latent_multiple
        if resolution % multiple:
            raise ConfigError(
                f"data.resolution: {resolution} px is not a multiple of {multiple}, which {self.name} needs "
                f"(its VAE downsamples {vae_scale}x, its denoiser takes {self.latent_multiple} x "
                f"{self.latent_multiple} latent patches); e.g. {resolution - resolution % multiple} or "
                f"{resolution - resolution % multiple + multiple}"
            )

    def pipeline_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)
