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

__all__ = [
    "CLIP_ATTENTION",
    "Family",
    "Option",
    "TextLora",
    "accept_index",
    "diffusers_lora_state",
    "guidance_scale",
    "no_preparation",
    "same_state",
    "scaled_latents",
    "vae_posterior",
]


CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The attention projections of a transformers CLIP text model, the modules diffusers' DreamBooth LoRA
scripts (`--train_text_encoder`) give adapters."""


@dataclass(frozen=True)
class TextLora:
    """A text encoder that can train LoRA (`model.lora_text_encoder`): its pipeline component, the modules
    that get adapters, and the kohya name prefix of its keys (`lora_te_`, `lora_te1_`, `lora_te2_`; "" when
    the family has no kohya naming). Only encoders whose adapters the family pipeline's
    `save_lora_weights` / `load_lora_weights` round-trip are declared."""

    component: str
    targets: tuple[str, ...] = CLIP_ATTENTION
    kohya: str = ""
    kohya_root: str = "text_model."
    """The module path kohya's names start from: CLIP's `text_model.` (the layout of transformers < 5's
    `CLIPTextModel`, which kohya, ComfyUI and diffusers' converters read); added where the model lacks it."""


def same_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """LoRA weights saved under peft's own key names (what diffusers' transformer LoRA loaders read)."""
    return state_dict


def diffusers_lora_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """peft -> diffusers LoRA key names, as diffusers' UNet LoRA training scripts save them."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(state_dict)


def no_preparation(pipe: Any) -> None:
    """Nothing to change on a loaded pipeline before sampling."""


def no_overrides(options: Any) -> dict[str, Any]:
    """The pipeline's own components when loading (and saving): no overrides."""
    return {}


def sequence_length(tokens: str, default: int) -> Option:
    """`family.max_sequence_length`: how many `tokens` each caption is padded or cut to (0 = the pipeline's
    own `default`); part of the cache key, since it changes the conditions."""
    return Option(
        "max_sequence_length",
        int,
        0,
        f"{tokens} (0 = the pipeline's default, {default})",
        check=lambda v: v >= 0,
        rule="must be >= 0",
        formerly="model.max_sequence_length",
        cached=True,
    )


def vae_posterior(vae: Any, pixels: Any) -> Any:
    """The VAE's posterior (a diffusers `DiagonalGaussianDistribution`) of pixels in [-1, 1], as the
    pipelines' image encoders call it: `vae.encode(pixels).latent_dist` in the VAE's dtype."""
    return vae.encode(pixels.to(dtype=vae.dtype)).latent_dist


def scaled_latents(vae: Any, z: Any) -> Any:
    """(z - shift_factor) * scaling_factor: the latent space of the SD, SDXL, SD3, Flux.1 and Z-Image
    denoisers (shift only where the VAE's config has one)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift if shift else z) * vae.config.scaling_factor  # (z - 0.0 is z, bit for bit)


def guidance_scale(guidance: float) -> dict[str, Any]:
    """A sampler's guidance as the pipeline's `guidance_scale` keyword (classifier-free or embedded)."""
    return {"guidance_scale": guidance}


def accept_index(info: dict[str, Any]) -> None:
    """Every model_index.json of the family's pipeline class is trainable."""


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    class_names: tuple[str, ...]
    denoiser: str
    process: str
    encode_text: Callable[..., dict[str, Any]]
    image_conditions: Callable[..., dict[str, Any]]
    predict: Callable[..., Any]
    about: str = ""
    load_kwargs: Callable[[Any], dict[str, Any]] = no_overrides
    options: tuple[Option, ...] = ()
    latent_patch: int = 1
    packed_latents: bool = False
    lora_state_for_saving: Callable[[dict[str, Any]], dict[str, Any]] = same_state
    prepare_sampling: Callable[[Any], None] = no_preparation
    sampling: dict[str, Any] | None = field(default=None, hash=False)
    embeddings: tuple[str, ...] = ()
    """Condition keys holding float embeddings, cast to a half-precision reference's dtype; every other
    condition (SDXL's size ids, Flux's guidance) reaches every model as it is, never rounded."""
    posterior: Callable[[Any, Any], Any] = vae_posterior
    """(vae, pixels [N, 3, H, W], or [N, 3, F, H, W] for a video family) -> the VAE's posterior."""
    to_latents: Callable[[Any, Any], Any] = scaled_latents
    """(vae, z) -> the denoiser's latents from a VAE latent (a posterior sample or mean), in the layout
    `predict` takes; its pipeline's own normalisation (scaling and shift, per-channel statistics, ...)."""
    shift_mu: Callable[[int, Any, Any], float] | None = None
    """(image tokens, scheduler config, options) -> mu of a dynamically shifted flow scheduler, as its
    pipeline computes it; None = FluxPipeline's `calculate_shift` with the config's lengths and shifts."""
    guidance_kwargs: Callable[[float], dict[str, Any]] = guidance_scale
    """A sampler's guidance -> the pipeline call's keywords (Qwen-Image's CFG is `true_cfg_scale`)."""
    check_index: Callable[[dict[str, Any]], None] = accept_index
    """Refuses a model_index.json of the family's class that xdpo cannot train, with one line."""
    text_lora: tuple[TextLora, ...] = ()
    """The text encoders that can train LoRA beside the denoiser (`model.lora_text_encoder`); () = none (the
    family pipeline's LoRA loader reads no text-encoder adapters)."""
    sampled_latents: Callable[[Any, Any, int, int], Any] | None = None
    """(pipeline, its latents at the last sampling step, image height, width in px) -> the denoiser's latents
    [N, C, h, w] (what `to_latents` gives); None: the pipeline's own `_unpack_latents` for packed
    families, the latents as they are otherwise (the rollout engine's samples)."""
    video: bool = False
    """The family makes videos: its data are clips of `data.num_frames` frames (pixels [N, 3, F, H, W]),
    its latents [N, C, F', h, w], its samples videos."""

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

    def check_frames(self, num_frames: int, temporal: int) -> None:
        """One line naming `data.num_frames` when the family takes clips and the count does not fit its VAE's
        temporal compression (`temporal` frames per latent frame after the first: 4k + 1 for Wan's), or
        when an image family is given clips."""
        if not self.video:
            if num_frames:
                raise ConfigError(
                    f"config key `data.num_frames`: {self.name} makes images; set data.num_frames=0 (got {num_frames})"
                )
            return
        if num_frames < 1 or (num_frames - 1) % temporal:
            k = max((num_frames - 1) // temporal, 0)
            raise ConfigError(
                f"config key `data.num_frames`: {self.name} takes clips of {temporal}k + 1 frames (its VAE "
                f"compresses {temporal} frames into one after the first), got {num_frames}; e.g. "
                f"{temporal * k + 1} or {temporal * (k + 1) + 1}"
            )

    def cache_keys(self, options: Any) -> dict[str, Any]:
        """The family's settings a text cache depends on, by config key (`family.<name>`)."""
        return {f"family.{o.name}": getattr(options, o.name) for o in self.options if o.cached}
