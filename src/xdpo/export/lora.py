"""LoRA weights of a run's `final/` in the formats UIs and libraries load, and merged into whole weights.

final/pytorch_lora_weights.safetensors holds the denoiser's LoRA as the family's pipeline saves it
(`save_lora_weights`: diffusers' names for the UNet families, peft's for the transformers; the adapter's
config, lora_alpha included, in the file's metadata). From it:
- diffusers/peft: the same file (the hub's and diffusers' format: `pipe.load_lora_weights(folder)`);
- kohya (AUTOMATIC1111, ComfyUI, Forge, InvokeAI): diffusers' `convert_state_dict_to_kohya` on the peft
  names, `lora_unet_<module>` for the UNet families (SD, SDXL), `lora_transformer_<module>` for Flux (the
  names ComfyUI and diffusers' Flux loader read), with `.alpha` = the adapter's scale x rank (kohya's
  weight scale is alpha / rank); SD3 has no kohya naming in diffusers (its diffusers file loads in ComfyUI);
  the text encoders' LoRA (`model.lora_text_encoder`) under their family's kohya prefixes (`Family.text_lora`:
  `lora_te_` for SD 1.x's one encoder, `lora_te1_` / `lora_te2_` for SDXL's two, `lora_te1_` for Flux's CLIP,
  the names diffusers' kohya converters read);
- merged: the base pipeline with the LoRA fused into its weights (`fuse_lora`: the denoiser's and the text
  encoders'), saved as a full pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_PREFIX = {"sd": "lora_unet_", "sdxl": "lora_unet_", "flux": "lora_transformer_"}
"""The families whose LoRA has a kohya naming diffusers reads back, and its prefix."""
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the adapter's config in the file's metadata


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, the adapter's config from the file's metadata ({} when absent))."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"export: {path} not found (a LoRA run's final/ holds {LORA_FILE})")
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
    return load_file(str(path)), json.loads(meta) if meta else {}


def lora_scale(meta: dict[str, Any], denoiser: str, fallback_alpha: float, rank: int) -> float:
    """The adapter's scale: lora_alpha / r (peft), or lora_alpha / sqrt(r) with rsLoRA."""
    alpha = float(meta.get(f"{denoiser}.lora_alpha", fallback_alpha))
    r = int(meta.get(f"{denoiser}.r", rank))
    return alpha / (math.sqrt(r) if meta.get(f"{denoiser}.use_rslora") else r)


def to_kohya(
    state: dict[str, torch.Tensor], family: str, denoiser: str, scale: float,
    text: dict[str, tuple[str, float, str]] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """kohya-named LoRA weights (module docstring) from the pipeline's LoRA file's tensors. `text`: each
    text encoder component in the file -> (its kohya prefix, its adapter's scale, the module path kohya's
    names start from: `TextLora.kohya_root`, added where the file's keys lack it)."""
    if family not in KOHYA_PREFIX:
        raise ConfigError(
            f"export: no kohya naming for {family} LoRAs in diffusers (kohya formats: {', '.join(KOHYA_PREFIX)}); "
            "the diffusers file loads in ComfyUI"
        )
    parts = {denoiser: (KOHYA_PREFIX[family], scale, ""), **(text or {})}
    out: dict[str, torch.Tensor] = {}
    used = 0
    for component, (prefix, s, root) in parts.items():
        inner = {k[len(component) + 1 :]: v for k, v in state.items() if k.startswith(f"{component}.")}
        if not prefix and inner:
            raise ConfigError(f"export: no kohya naming for the {component} LoRA of {family} models")
        inner = {(k if k.startswith(root) else root + k): v for k, v in inner.items()}
        out |= kohya_part(inner, prefix, s)
        used += len(inner)
    if used != len(state):
        raise ConfigError(
            f"export: the LoRA file holds weights outside the {', '.join(parts)} (run config and file disagree)"
        )
    return out


def kohya_part(inner: dict[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """One component's LoRA (keys without the component's name) in kohya naming under `prefix`, with alpha."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    if not inner:
        return {}
    peft = convert_all_state_dict_to_peft({f"unet.{k}": v for k, v in inner.items()})
    # "unet.<module>.lora_A.weight" -> "lora_unet_<module>.lora_down.weight"
    kohya = convert_state_dict_to_kohya(peft)
    out = {}
    for key, value in kohya.items():
        name = prefix + key.removeprefix("lora_unet_")
        if key.endswith(".alpha"):
            rank = kohya[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
            value = torch.tensor(scale * rank, dtype=torch.float32)  # kohya scales by alpha / rank
        out[name] = value.contiguous()
    return out


def merge(
    base: str, lora_folder: Path, out: Path, pipeline_cls: Any, load_kwargs: dict[str, Any],
    components: list[str] | None = None,
) -> Path:  # fmt: skip
    """The base pipeline with the LoRA of `lora_folder` fused into its weights, saved in `out`;
    `components`: those whose LoRA is fused (the denoiser and any trained text encoders; None = the
    pipeline's default)."""
    pipe = pipeline_cls.from_pretrained(base, **load_kwargs)
    pipe.load_lora_weights(lora_folder, adapter_name="xdpo")
    pipe.fuse_lora(adapter_names=["xdpo"], **({"components": components} if components else {}))
    pipe.unload_lora_weights()
    pipe.save_pretrained(out)
    return out
