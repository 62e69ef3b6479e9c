"""Model families behind one interface (docs/design.md §8): one small module per family, one registry.

A `Family` says how a diffusers pipeline of that family is trained:
- `pipeline_class`: the diffusers pipeline that loads the base, samples and saves `final/`;
- `denoiser`: the pipeline component that is trained (`unet` or `transformer`);
- `process`: the noise process (`ddpm` or `flow`, see `xdpo.models.noise`);
- `load_kwargs(model_cfg)`: component overrides when loading (and saving) the pipeline;
- `encode_text(comps, captions, device)`: the prompt conditions, a dict of batch-first tensors [B, ...];
- `image_conditions(comps, batch, n)`: per-image conditions for [w; l] (SDXL's time ids), or {};
- `predict(model, noisy, t, cond)`: the only place a denoiser is called; returns the prediction in
  the latent layout [N, C, h, w] whatever the model's own layout (Flux packs and unpacks inside);
- `embeddings`: the condition keys that are float embeddings (the only ones cast to a half-precision
  reference's dtype; ids, sizes and guidance never are);
- `latent_multiple`: the latent side's multiple (SD3's and Flux's 2 x 2 patches; `check_resolution`).

A new family is one module defining `FAMILY` plus one line in `FAMILIES`.
"""

from __future__ import annotations

from xdpo.errors import ConfigError
from xdpo.models.families.spec import Family

__all__ = ["FAMILY_NAMES", "Family", "family_of_class", "get_family"]


def _registry() -> dict[str, Family]:
    from xdpo.models.families import flux, sd, sd3, sdxl

    return {f.FAMILY.name: f.FAMILY for f in (sd, sdxl, sd3, flux)}


FAMILY_NAMES = ("sd", "sdxl", "sd3", "flux")
"""Kept equal to the registry's keys by a test (the config's `model.family` choices)."""


def get_family(name: str) -> Family:
    families = _registry()
    if name not in families:
        raise ConfigError(f"model.family: unknown family {name!r} (choose from {', '.join(families)})")
    return families[name]


def family_of_class(class_name: str) -> Family | None:
    """The family whose pipelines carry `_class_name` = `class_name` in model_index.json."""
    for fam in _registry().values():
        if class_name in fam.class_names:
            return fam
    return None
