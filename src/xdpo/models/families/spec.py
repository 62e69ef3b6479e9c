"""The `Family` record: how a diffusers pipeline of one family is trained (see `families/__init__.py`).
Its options are `Option`s (`xdpo.config.options`), keys of the config's `family` section.

Light on purpose (no torch): the registry and the config read these records before any model loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xdpo.config.options import Option
from xdpo.errors import ConfigError

__all__ = ["Family", "Option", "diffusers_lora_state", "no_preparation", "same_state"]


def same_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """LoRA weights saved under peft's own key names (what diffusers' transformer LoRA loaders read)."""
    return state_dict


def diffusers_lora_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """peft -> diffusers LoRA key names, as diffusers' UNet LoRA training scripts save them."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(state_dict)


def no_preparation(pipe: Any) -> None:
    """Nothing to change on a loaded pipeline before sampling."""


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
    options: tuple[Option, ...] = ()
    latent_patch: int = 1
    packed_latents: bool = False
    lora_state_for_saving: Callable[[dict[str, Any]], dict[str, Any]] = same_state
    prepare_sampling: Callable[[Any], None] = no_preparation
    sampling: dict[str, Any] | None = field(default=None, hash=False)
    embeddings: tuple[str, ...] = ()
    """Condition keys holding float embeddings, cast to a half-precision reference's dtype; every other
    condition (SDXL's size ids, Flux's guidance) reaches every model as it is, never rounded."""

    def pipeline_cls(self) -> type:
        """The pipeline class: a diffusers class name, or `package.module.Class` for one defined elsewhere."""
        import importlib

        module, _, name = self.pipeline_class.rpartition(".")
        return getattr(importlib.import_module(module or "diffusers"), name)

    def image_tokens(self, latent_h: int, latent_w: int) -> int:
        """Image tokens the denoiser sees for latents of h x w: (h / p)(w / p), p = `latent_patch`
        (Flux packs 2x2 latent patches; SD3's transformer embeds 2x2 patches); FluxPipeline's
        `image_seq_len`, which sets Flux's resolution-dependent shift."""
        p = self.latent_patch
        if latent_h % p or latent_w % p:
            raise ConfigError(
                f"config key `data.resolution`: latents of {latent_h} x {latent_w} do not split into the "
                f"{p} x {p} patches of {self.name} models"
            )
        return (latent_h // p) * (latent_w // p)

    def check_resolution(self, resolution: int, vae_scale: int) -> None:
        """One line naming `data.resolution` when it is not a multiple of vae_scale x `latent_patch`."""
        multiple = vae_scale * self.latent_patch
        if resolution % multiple:
            low = resolution - resolution % multiple
            raise ConfigError(
                f"config key `data.resolution`: {resolution} px is not a multiple of {multiple}, which "
                f"{self.name} needs (its VAE downsamples {vae_scale}x, its denoiser takes {self.latent_patch} x "
                f"{self.latent_patch} latent patches); e.g. {low or multiple} or {low + multiple}"
            )

    def cache_keys(self, options: Any) -> dict[str, Any]:
        """The family's settings a text cache depends on, by config key (`family.<name>`)."""
        return {f"family.{o.name}": getattr(options, o.name) for o in self.options if o.cached}
