"""Model families behind one interface (docs/design.md §8): one small module per family, one registry.

A `Family` (spec.py) says how a diffusers pipeline of that family is trained:
- `pipeline_class`: the pipeline that loads the base, samples and saves `final/` (a diffusers class name,
  or `package.module.Class`); `class_names`: the `_class_name`s of model_index.json it trains;
- `denoiser`: the pipeline component that is trained (`unet` or `transformer`);
- `process`: the noise process (`ddpm` or `flow`, see `xdpo.models.noise`);
- `options`: its knobs, the config's `family.<name>` keys (`Option`, `xdpo.config.options`: type, default,
  help, check);
- `load_kwargs(options)`: component overrides when loading (and saving) the pipeline (default: none);
- `encode_text(comps, captions, device)`: the prompt conditions, a dict of batch-first tensors [B, ...]
  (autograd as the caller sets it: a family with `text_lora` must not disable it, its encoders may train);
- `image_conditions(comps, n, pixel_size, sizes)`: per-image conditions of n images (SDXL's time ids), or {};
- `predict(model, noisy, t, cond)`: the only place a denoiser is called; returns the prediction in
  the latent layout [N, C, h, w] whatever the model's own layout (Flux packs and unpacks inside);
- `latent_patch`: latent pixels per image-token side (`image_tokens`; `check_resolution` with the VAE factor);
- `packed_latents`: the denoiser's latents are packed, so its pipeline draws the initial noise itself;
- `lora_state_for_saving(state_dict)`: peft LoRA weights -> the key names its pipeline's LoRA loader reads;
- `prepare_sampling(pipe)`: changes to a loaded pipeline before sampling (SD3 without T5: zero padding once);
- `sampling`: the pipeline's own sampling defaults (steps, guidance, scheduler), None = the SD papers';
- `text_lora`: the text encoders that can train LoRA (`TextLora`: component, target modules, kohya prefix);
- `embeddings`: the condition keys that are float embeddings (the only ones cast to a half-precision
  reference's dtype; ids, sizes and guidance never are).

A new family is one module defining `FAMILY` plus one name in `BUILT_IN`, or `register_family(FAMILY)`
from outside the package (a plugin, a test). Importing this module imports no family: the registry
loads them on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import cache
from typing import Any

from xdpo.errors import ConfigError
from xdpo.models.families.spec import Family, Option

__all__ = [
    "Family",
    "Option",
    "check_config",
    "denoiser_names",
    "families",
    "family_names",
    "family_of_class",
    "family_of_pipeline",
    "family_options",
    "get_family",
    "pipeline_classes",
    "register_family",
]

BUILT_IN = ("sd", "sdxl", "sd3", "flux", "qwenimage", "flux2", "flux2_klein", "zimage", "wan")
"""The modules of this package that define a `FAMILY`, in the order the registry lists them."""

_registered: dict[str, Family] = {}


@cache
def _built_in() -> dict[str, Family]:
    modules = [importlib.import_module(f"{__name__}.{m}") for m in BUILT_IN]
    return {m.FAMILY.name: m.FAMILY for m in modules}


def families() -> dict[str, Family]:
    """Every family by name: the built-in ones, then those registered with `register_family`."""
    return {**_built_in(), **_registered}


def family_names() -> tuple[str, ...]:
    """The names `model.family` accepts (besides `auto`)."""
    return tuple(families())


def register_family(family: Family) -> Family:
    """Add `family` to the registry (its detection, `model.family` choice and `family.*` keys); returns it.
    A name already taken, or an option clashing with another family's of the same name, is refused."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family: expected a Family record, got {type(family).__name__}")
    if family.name in families() or family.name == "auto":
        raise ConfigError(f"register_family: a family named {family.name!r} is already registered")
    _merge_options([*families().values(), family])
    _registered[family.name] = family
    return family


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise ConfigError(f"model.family: unknown family {name!r} (choose from {', '.join(known)})")
    return known[name]


def family_of_class(class_name: str) -> Family | None:
    """The family whose pipelines carry `_class_name` = `class_name` in model_index.json."""
    for fam in families().values():
        if class_name in fam.class_names:
            return fam
    return None


def family_of_pipeline(pipe: Any) -> Family | None:
    """The family of a loaded pipeline: the first class of its class hierarchy that a family names."""
    for cls in type(pipe).__mro__:
        fam = family_of_class(cls.__name__)
        if fam is not None:
            return fam
    return None


def pipeline_classes() -> tuple[str, ...]:
    """Every `_class_name` a family trains (for messages)."""
    return tuple(c for fam in families().values() for c in fam.class_names)


def denoiser_names() -> tuple[str, ...]:
    """The pipeline components the families train (`unet`, `transformer`), each once."""
    return tuple(dict.fromkeys(fam.denoiser for fam in families().values()))


def family_options() -> tuple[Option, ...]:
    """The config's `family` section: every family's options, one per name (help prefixed by the families
    that declare it)."""
    return _merge_options(list(families().values()))


def check_config(cfg: Any) -> None:
    """The families' rules on a run config (a rule owner of `xdpo.config.rules`): each family's checks of
    its `family.*` keys (`data.resolution` is checked against the family and its VAE once the model is
    found: `Family.check_resolution`)."""
    for fam in families().values():
        for o in fam.options:
            value = getattr(cfg.family, o.name)
            if o.check is not None and not o.check(value):
                raise ConfigError(f"config key `family.{o.name}`: {o.rule}, got {value!r}")


def _merge_options(fams: list[Family]) -> tuple[Option, ...]:
    declared: dict[str, list[tuple[str, Option]]] = {}
    for fam in fams:
        for o in fam.options:
            declared.setdefault(o.name, []).append((fam.name, o))
    merged = []
    for name, decl in declared.items():
        first = decl[0][1]
        for fam_name, o in decl[1:]:
            if (o.type, o.default, o.formerly) != (first.type, first.default, first.formerly):
                raise ConfigError(
                    f"family option {name!r} of {fam_name} differs from {decl[0][0]}'s in type, default or "
                    "former key; one key cannot hold both"
                )
        helps: dict[str, list[str]] = {}
        for fam_name, o in decl:
            helps.setdefault(o.help, []).append(fam_name)
        text = "; ".join(f"{', '.join(names)}: {h}" for h, names in helps.items())
        merged.append(dataclasses.replace(first, help=text, check=None, rule=""))
    return tuple(merged)
