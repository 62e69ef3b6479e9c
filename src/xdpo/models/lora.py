"""Adapters on a frozen denoiser (peft through diffusers' `add_adapter`): LoRA, DoRA, LoKr, LoHa.

`model.lora_type`:
- lora: W + (alpha / r) B A (Hu et al. 2021), peft's `LoraConfig`;
- dora: LoRA with its direction and magnitude trained apart, m (W + s B A) / ||W + s B A||_c (Liu et al.
  2024), `LoraConfig(use_dora=True)`;
- lokr: W + s (C kron (B A)) (LyCORIS' Kronecker product), peft's `LoKrConfig`;
- loha: W + s (B1 A1) * (B2 A2) (Hadamard product of two low-rank matrices; FedPara, Hyeon-Woo et al. 2022),
  peft's `LoHaConfig`.
LoRA and DoRA are saved as `pytorch_lora_weights.safetensors` in the family's format (the pipeline's
`load_lora_weights` reads them); LoKr and LoHa, which diffusers' LoRA loaders do not read, in peft's own
format: `adapter_config.json` + `adapter_model.safetensors`, which `load_adapter` puts back on a pipeline's
denoiser with peft's public API (`inject_adapter_in_model`, `set_peft_model_state_dict`).

`model.lora_text_encoder`: the same adapter kind, rank and alpha on the text encoders the family declares
(`Family.text_lora`: CLIP attention, as diffusers' DreamBooth LoRA scripts' `--train_text_encoder`), trained
at `model.lora_text_encoder_lr` in their own optimizer group; with their adapters off they are the base
encoders (the reference's conditions). In final/ they sit beside the denoiser's in the pipeline's LoRA file
(`text_encoder.*`, `text_encoder_2.*`), or, for LoKr / LoHa, in peft's format in `final/<component>/`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import ConfigError

TYPES = ("lora", "dora", "lokr", "loha")
PEFT_FORMAT = ("lokr", "loha")  # saved in peft's adapter format (diffusers' LoRA loaders do not read them)
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}`: {what}, got {value!r}")


def check(cfg: Any) -> None:
    """The adapters' rules across keys (a rule owner of `xdpo.config.rules`)."""
    m = cfg.model
    require(
        m.quantize == "none" or m.lora_rank > 0,
        "model.quantize",
        "quantises the frozen base of LoRA training; set model.lora_rank > 0 (a full fine-tune trains the "
        "weights themselves)",
        m.quantize,
    )
    require(
        m.lora_type == "lora" or m.lora_rank > 0,
        "model.lora_type",
        "needs model.lora_rank > 0",
        m.lora_type,
    )
    require(
        not (m.lora_type in PEFT_FORMAT and m.quantize in ("int8", "nf4")),
        "model.lora_type",
        f"{m.lora_type} has no bitsandbytes layers in peft; use lora or dora with model.quantize={m.quantize}",
        m.lora_type,
    )
    require(
        not (m.lora_type == "dora" and m.quantize == "int8"),
        "model.lora_type",
        "dora on an int8 base loses bitsandbytes' int8 scales after the first step (peft 0.21, bitsandbytes "
        "0.50); use model.quantize=nf4 or fp8 with dora",
        m.lora_type,
    )
    check_text_encoder(cfg)


def check_text_encoder(cfg: Any) -> None:
    """`model.lora_text_encoder`'s rules: LoRA on the denoiser too, text encoded each step (no cache), and a
    frozen reference (its conditions come from the base encoders: the adapters off)."""
    m = cfg.model
    require(
        m.lora_text_encoder_lr is None or m.lora_text_encoder,
        "model.lora_text_encoder_lr",
        "has no effect without model.lora_text_encoder=true",
        m.lora_text_encoder_lr,
    )
    if not m.lora_text_encoder:
        return
    require(m.lora_rank > 0, "model.lora_text_encoder", "needs model.lora_rank > 0 (LoRA training)", True)
    require(
        not cfg.data.cache,
        "data.cache",
        "holds text encodings of the base text encoders, but model.lora_text_encoder=true trains them: their "
        "encodings must be computed each step; leave data.cache empty",
        cfg.data.cache,
    )
    require(
        cfg.reference.strategy == "frozen",
        "reference.strategy",
        "must be frozen with model.lora_text_encoder=true (the reference conditions on the base text "
        "encoders; a moving reference would need their adapter snapshot too)",
        cfg.reference.strategy,
    )


def adapter_config(cfg: Any, targets: tuple[str, ...] | list[str] | None = None) -> Any:
    """The peft config of `model.lora_type` with the run's rank, alpha, dropout and target modules
    (`targets`: a text encoder's, default `model.lora_targets`)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = cfg.lora_alpha or cfg.lora_rank
    targets = list(cfg.lora_targets if targets is None else targets)
    if cfg.lora_type in ("lora", "dora"):
        return LoraConfig(
            r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
            target_modules=targets, use_dora=cfg.lora_type == "dora",
        )  # fmt: skip
    cls = LoKrConfig if cfg.lora_type == "lokr" else LoHaConfig
    return cls(r=cfg.lora_rank, alpha=alpha, rank_dropout=cfg.lora_dropout, target_modules=targets)


def add_lora(model: Any, cfg: Any) -> None:
    """Attach the adapters of `model.lora_type` (peft, through diffusers' integration); only they are
    trainable, in fp32 under mixed precision."""
    model.requires_grad_(False)
    try:
        model.add_adapter(adapter_config(cfg))
    except ValueError as e:
        raise ConfigError(f"model.lora_targets: {e}") from None
    from diffusers.training_utils import cast_training_params

    cast_training_params(model, dtype=torch.float32)


def add_text_lora(family: Any, encoders: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The adapters of `model.lora_type` on each text encoder the family declares (`Family.text_lora`) and
    the run loaded, through peft's `inject_adapter_in_model` (transformers' models have no diffusers
    `add_adapter`); only they train, in fp32. Returns the trained encoders by component."""
    from diffusers.training_utils import cast_training_params
    from peft import inject_adapter_in_model

    trained = {t.component: (t, encoders[t.component]) for t in family.text_lora if t.component in encoders}
    if not trained:
        raise ConfigError(
            f"config key `model.lora_text_encoder`: {family.name} declares no text encoder that trains LoRA "
            "(its pipeline's LoRA loader reads none); set it to false"
        )
    for spec, enc in trained.values():
        enc.requires_grad_(False)
        try:
            inject_adapter_in_model(adapter_config(cfg, spec.targets), enc)
        except ValueError as e:
            raise ConfigError(f"model.lora_text_encoder: {spec.component}: {e}") from None
        cast_training_params(enc, dtype=torch.float32)
        # eval mode kept: bitsandbytes' int8 layers compute differently in train mode, so the policy's
        # encodings would differ from the base's at initialisation (the adapters' dropout is not applied)
        enc.eval()
    return {name: enc for name, (_, enc) in trained.items()}


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """A model's adapter weights under peft's key names (what `set_peft_model_state_dict` takes back)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def text_adapter_state(encoders: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every trained text encoder's adapter weights, keyed `<component>.<peft key>`."""
    return {f"{name}.{k}": v for name, enc in encoders.items() for k, v in adapter_state(enc).items()}


def load_text_adapter_state(encoders: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> None:
    """Put `text_adapter_state`'s weights back, exactly; one line when they do not fit the encoders."""
    from peft.utils import set_peft_model_state_dict

    for name, enc in encoders.items():
        mine = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        if not mine:
            raise ConfigError(f"train.resume_from: {where} holds no LoRA weights of {name}")
        result = set_peft_model_state_dict(enc, mine)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"train.resume_from: {where} has {name} adapter keys this model lacks")


@contextmanager
def text_adapters_disabled(encoders: dict[str, Any]):
    """The base text encoders inside the block: every adapter off (`adapters_disabled`)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for enc in encoders.values():
            stack.enter_context(adapters_disabled(enc))
        yield


def tuner_layers(model: Any) -> list[Any]:
    """The model's adapter layers, found once (walking every module each micro-step costs ~2 ms at 16 px)."""
    cached = model.__dict__.get("_xdpo_tuner_layers")
    if cached is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        cached = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        model.__dict__["_xdpo_tuner_layers"] = cached
    return cached


@contextmanager
def adapters_disabled(model: Any):
    """The base denoiser inside the block: adapters off through peft's public per-layer switch
    (`BaseTunerLayer.enable_adapters`, what diffusers' `disable_adapters` calls on each layer), on the
    model's adapter layers found once instead of a walk over every module per call."""
    layers = [m for m in tuner_layers(model) if not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def save_adapters(
    fam: Any, model: Any, out: Path, state_dict: dict[str, Any] | None = None,
    text_encoders: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """`final/`'s adapter weights: LoRA / DoRA in the family pipeline's LoRA format, LoKr / LoHa in peft's.
    `state_dict`: the whole (gathered) weights of a sharded model, None to read `model`'s; `text_encoders`:
    the trained text encoders by component (`model.lora_text_encoder`), saved beside the denoiser's."""
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config["default"]
    state = get_peft_model_state_dict(model, state_dict=state_dict)
    encoders = text_encoders or {}
    out.mkdir(parents=True, exist_ok=True)
    if adapter_type(config) in PEFT_FORMAT:
        save_peft(config, state, out)
        for name, enc in encoders.items():
            save_peft(enc.peft_config["default"], adapter_state(enc), out / name)
        return
    layers = {f"{fam.denoiser}_lora_layers": fam.lora_state_for_saving(state),
              f"{fam.denoiser}_lora_adapter_metadata": config.to_dict()}  # fmt: skip
    for name, enc in encoders.items():  # the pipelines' keywords: text_encoder_lora_layers, ...
        layers[f"{name}_lora_layers"] = fam.lora_state_for_saving(adapter_state(enc))
        layers[f"{name}_lora_adapter_metadata"] = enc.peft_config["default"].to_dict()
    # the metadata keeps lora_alpha != rank (and DoRA) right on loading
    fam.pipeline_cls().save_lora_weights(out, **layers, safe_serialization=True)


def save_peft(config: Any, state: dict[str, Any], out: Path) -> None:
    """An adapter in peft's format: adapter_config.json + adapter_model.safetensors in `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / PEFT_WEIGHTS))
    (out / PEFT_CONFIG).write_text(json.dumps(_jsonable(config.to_dict()), indent=2))


def adapter_type(config: Any) -> str:
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    return "dora" if kind == "lora" and getattr(config, "use_dora", False) else kind


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in d.items()}


def is_peft_adapter(folder: Path) -> bool:
    return (Path(folder) / PEFT_CONFIG).is_file() and (Path(folder) / PEFT_WEIGHTS).is_file()


def load_adapter(denoiser: Any, folder: Path) -> Any:
    """Put the peft-format adapter of `folder` (LoKr, LoHa) on `denoiser` (a pipeline's), with peft's public
    API; returns the denoiser."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(folder))
    inject_adapter_in_model(config, denoiser)
    result = set_peft_model_state_dict(denoiser, load_file(str(Path(folder) / PEFT_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"lora: {folder} holds adapter weights this model has no layers for")
    param = next(denoiser.parameters())
    return denoiser.to(device=param.device)


def load_peft_adapters(pipe: Any, denoiser: str, folder: Path) -> None:
    """A peft-format final/ (LoKr, LoHa) onto a pipeline: the denoiser's adapter, and each text encoder's
    from its subfolder (`final/<component>/`, `model.lora_text_encoder`)."""
    load_adapter(getattr(pipe, denoiser), folder)
    for name, component in pipe.components.items():
        if name.startswith("text_encoder") and component is not None and is_peft_adapter(Path(folder) / name):
            load_adapter(component, Path(folder) / name)
