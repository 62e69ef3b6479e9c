"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before anything runs.

Every key is a dataclass field with a default and a one-line help text (`xdpo train --help` prints
them all). Unknown keys, wrong types and impossible values raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xdpo.errors import ConfigError
from xdpo.family_config import family_choices, family_section, rename_old_keys, validate_family


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    pretrained: str = _f(
        "",
        "diffusers pipeline folder or hub id (SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1); "
        "`digits` / `digits-flow` = the shipped digits bases",
    )
    revision: str | None = _f(None, "hub revision of `pretrained`")
    family: str = _f(
        "auto", "model family; auto = read from model_index.json (_class_name)", choices=family_choices
    )
    vae: str = _f("", "another VAE folder or hub id (e.g. SDXL's fp16-fix VAE); empty = the pipeline's")
    lora_rank: int = _f(0, "LoRA rank on the denoiser's attention projections; 0 = full fine-tune")
    lora_alpha: float | None = _f(None, "LoRA alpha; empty = lora_rank (scale 1)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: list[str] = _f(
        ["to_q", "to_k", "to_v", "to_out.0"],
        "denoiser modules that get LoRA adapters (attention q, k, v, out)",
    )
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the denoiser")
    reference_dtype: Literal["auto", "fp32", "fp16", "bf16"] = _f(
        "auto", "dtype of the frozen reference denoiser (full fine-tune); auto = the mixed-precision dtype"
    )


DATA_COLUMNS = {"pairs": ("caption", "jpg_0", "jpg_1", "label_0"), "images": ("image", "caption", "label")}
"""xdpo's column names per `data.format` (what `data.columns` maps to the dataset's own names)."""


@dataclass
class DataConfig:
    path: str = _f(
        "",
        "parquet file/glob/folder, save_to_disk folder, webdataset .tar shards (folder, glob or comma list), "
        "or hub id",
    )
    split: str = _f("train", "split of a DatasetDict folder or hub dataset")
    format: Literal["pairs", "images"] = _f(
        "pairs",
        "pairs = (caption, preferred, dispreferred) rows; images = (image, caption, label 1 desirable / "
        "0 undesirable) rows, Diffusion-KTO's data (needs loss.objective=kto)",
    )
    columns: dict[str, str] = _f(
        {},
        "xdpo name -> the dataset's column, e.g. caption:prompt,jpg_0:chosen,jpg_1:rejected (pairs: caption, "
        "jpg_0, jpg_1, label_0; images: image, caption, label); without label_0, jpg_0 is preferred",
    )
    streaming: bool = _f(
        False,
        "read data.path with load_dataset(streaming=True), keeping only the first data.max_pairs usable rows "
        "(kept in an Arrow file in the datasets cache): a subset without downloading everything",
    )
    resolution: int = _f(512, "square training resolution in pixels (resize shorter side, then crop)")
    ties: Literal["drop", "keep"] = _f(
        "drop",
        "label_0 = 0.5 rows: drop (Diffusion-DPO) or keep as soft targets (label 0.5; loss.objective=pair only)",
    )
    prompt_dropout: float = _f(0.0, "probability of an empty caption (Diffusion-DPO used 0.2)")
    flip: Literal["none", "pair", "independent"] = _f(
        "none", "horizontal flips: none, both images alike, or each"
    )
    random_crop: bool = _f(False, "random instead of center crop (same offsets for both images)")
    max_pairs: int = _f(
        0,
        "use only the first N pairs (images with data.format=images) after dropping ties and bad rows; "
        "0 = all; with data.streaming only these rows are read",
    )
    num_workers: int = _f(0, "DataLoader worker processes for JPEG decoding and transforms")
    on_bad_row: Literal["error", "skip"] = _f(
        "error", "a bad row (label, caption, image): stop with one line naming it, or leave it out and report"
    )
    cache: str = _f(
        "",
        "folder of VAE posteriors and text conditions written by `xdpo cache`; train reads them instead of "
        "encoding images and captions each step; empty = no cache",
    )
    sample_posterior: bool = _f(
        True, "latents sampled from the VAE posterior each step (Diffusion-DPO); false = its mean"
    )


@dataclass
class LossConfig:
    objective: Literal["pair", "sft", "kto"] = _f(
        "pair", "pair = preference loss on (w, l); sft = denoising loss on w; kto = Diffusion-KTO per image"
    )
    divergence: Literal["reverse_kl", "xdpo", "xdpo_eq9", "chi2", "js", "alpha"] = _f(
        "reverse_kl", "reward transform f'(z): reverse_kl = Diffusion-DPO; xdpo = xDPO Appendix C form"
    )
    outer: Literal["sigmoid", "hinge", "ipo", "robust"] = _f("sigmoid", "outer loss over the logits")
    beta: float = _f(5000.0, "regularisation strength (Diffusion-DPO 5000, xDPO 1000)")
    eta: float = _f(0.05, "xDPO: weight of the KL term (paper 0.05)")
    gamma: float = _f(1 / 6, "xDPO: weight of the higher-order term (paper 1/6)")
    n: float = _f(6.0, "xDPO: order of the higher-order term (paper 6)")
    alpha: float = _f(0.5, "alpha divergence: alpha in (0, 1]")
    label_smoothing: float = _f(0.0, "sigmoid: conservative-DPO smoothing; robust: assumed label-flip rate")
    logratio_scale: float = _f(1.0, "s in log z = -s (e_theta - e_ref)")
    clamp: float = _f(50.0, "clamp of exponent arguments |.| in the divergences (logged as clamp_fraction)")
    error_reduction: Literal["mean", "sum"] = _f(
        "mean", "per-sample error: mean over C,H,W (Diffusion-DPO) or sum (xDPO appendix; overflows)"
    )
    error_space: Literal["native", "epsilon"] = _f(
        "native",
        "errors of the model's own prediction (eps, v, x0, flow velocity) or converted to noise predictions",
    )
    beta_schedule: Literal["constant", "flow"] = _f(
        "constant", "flow models: constant beta (Flow-DPO), or beta (1 - sigma)^2 (derived, reward-hacks)"
    )


@dataclass
class ReferenceConfig:
    strategy: Literal["frozen", "periodic", "ema"] = _f(
        "frozen", "frozen = the initial model; periodic = Kang et al. 2025 stable update; ema"
    )
    update_every: int = _f(32, "tau: optimizer steps between reference updates (periodic, ema)")
    max_divergence: float = _f(
        0.005,
        "delta: estimated divergence from the initial model beyond which the reference freezes (periodic)",
    )
    on_exceed: Literal["freeze", "reinit"] = _f(
        "freeze",
        "periodic, divergence > delta: freeze the reference for good, or reset it to the initial model",
    )
    probe_size: int = _f(32, "preferred images drawn once from the data on which the divergence is estimated")
    probe_draws: int = _f(4, "(t, eps) draws per probe image for each divergence estimate")
    divergence: Literal["pred_mse", "error_gap"] = _f(
        "pred_mse", "divergence estimate: mean (pred - pred_initial)^2, or e - e_initial (signed)"
    )
    ema_decay: float = _f(0.99, "ema: ref <- decay * ref + (1 - decay) * policy every update_every steps")
    offload: bool = _f(
        False,
        "full fine-tune with reference.strategy=periodic: keep the initial-model copy on the CPU (ema has none)",
    )


@dataclass
class TimestepConfig:
    sampling: Literal["auto", "uniform", "skewed", "logit_normal"] = _f(
        "auto",
        "auto = uniform (UNet families, Diffusion-DPO) or logit_normal (flow families, SD3); "
        "skewed = toward noisy t (Kang et al. 2025)",
    )
    mean: float = _f(0.0, "logit_normal: location m of u = sigmoid(m + s n)")
    std: float = _f(1.0, "logit_normal: scale s")
    bins: int = _f(10, "skewed: number of equal bins over [0, T)")
    gamma: float = _f(
        0.9, "skewed: bin k (k = 0 the noisiest) drawn with probability proportional to gamma^k"
    )
    weighting: Literal["constant", "snr"] = _f(
        "constant",
        "lambda(t) multiplying beta: 1, or 1 + minmax(1/sqrt(SNR(t))) in [1, 2] (Kang et al. 2025; flow "
        "models: 1 + minmax(sigma))",
    )


@dataclass
class TrainConfig:
    max_steps: int = _f(2000, "optimizer steps")
    batch_size: int = _f(1, "pairs per device per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    learning_rate: float = _f(1e-8, "base learning rate (multiplied by the effective batch if scale_lr)")
    scale_lr: bool = _f(True, "lr x batch_size x grad_accum x processes, as Diffusion-DPO does")
    warmup_steps: int = _f(500, "linear warmup steps, then constant")
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 = off")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "autocast dtype for forward passes")
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = _f(
        "adamw", "AdamW (torch, foreach), 8-bit AdamW (bitsandbytes: 1/4 of AdamW's state) or Adafactor"
    )
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    checkpoint_every: int = _f(500, "save a resumable checkpoint every N steps; 0 = only at the end")
    checkpoints_keep: int = _f(2, "keep the newest N checkpoints; 0 = keep all")
    resume_from: str = _f("", "`latest`, a checkpoint folder, or empty for a fresh start")
    report_to: Literal["none", "tensorboard", "wandb"] = _f("none", "accelerate tracker for metrics")
    log_every: int = _f(1, "progress-bar refresh every N steps (metrics.jsonl has every step)")
    nonfinite: Literal["stop", "skip"] = _f(
        "stop", "non-finite loss: stop the run (weights untouched), or skip the step and count it"
    )
    max_nonfinite: int = _f(10, "skip: stop after this many non-finite steps in a row")
    log_deltas: bool = _f(
        False, "also log every image's delta (policy minus reference error) per step in metrics.jsonl"
    )
    online: bool = _f(
        False, "online DPO: every online_every steps, new pairs sampled from the policy and scored"
    )
    online_every: int = _f(
        40, "online: optimizer steps per round (flow_grpo's online DPO regenerates every ~40)"
    )
    online_prompts: str = _f(
        "", "online: prompt set or file the pairs are sampled for (as `xdpo pairs --prompts`)"
    )
    online_per_prompt: int = _f(4, "online: images sampled per prompt each round")
    online_scorer: str = _f("", "online: reward that labels them (as `xdpo pairs --scorer`)")
    online_min_gap: float | None = _f(
        None, "online: keep every pair with a score gap above this; empty = best vs worst"
    )
    online_sample_steps: int = _f(0, "online: sampling steps; 0 = the model's sampling defaults")


@dataclass
class Config:
    output_dir: str = _f("outputs/xdpo-run", "where config.yaml, metrics.jsonl, checkpoints/ and final/ go")
    seed: int = _f(0, "seed for data order, timesteps, noise and augmentation")
    model: ModelConfig = field(default_factory=ModelConfig)
    family: Any = field(
        default_factory=lambda: family_section()(),
        metadata={
            "section": family_section,
            "help": "the model family's own knobs, declared by the families",
        },
    )
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# flattening, parsing, validation


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted key, field, resolved type) for every leaf key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = f.metadata["section"]() if "section" in f.metadata else hints[f.name]
        if "choices" in f.metadata:
            tp = Literal[f.metadata["choices"]()]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def all_keys() -> list[str]:
    return [k for k, _, _ in iter_fields()]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("empty" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping name: column"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against type `tp`; ints are accepted for floats. Raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key `{key}`: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise bad
    if origin is dict:
        return _coerce_mapping(key, value, bad)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        return [_coerce(key, v, typing.get_args(tp)[0]) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-8` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool | dict | list):
            raise bad
        return str(value)
    raise bad


def _coerce_mapping(key: str, value: Any, bad: ConfigError) -> dict[str, str]:
    """A str -> str mapping from a YAML mapping or `a:b,c:d` text (empty or null = {})."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs = [part.split(":", 1) for part in value.split(",") if part.strip()]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise ConfigError(
                f"config key `{key}`: expected NAME:COLUMN pairs separated by commas, got {value!r}"
            )
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise bad
    out = {}
    for k, v in value.items():
        if isinstance(k, bool | dict | list) or isinstance(v, bool | dict | list) or k is None or v is None:
            raise ConfigError(f"config key `{key}`: expected names and columns as text, got {k!r}: {v!r}")
        out[str(k)] = str(v)
    return out


def _mapping_keys() -> set[str]:
    return {k for k, _, tp in iter_fields() if typing.get_origin(tp) is dict}


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return ConfigError(f"unknown config key `{key}`{hint}")


SECTIONS = ("model", "family", "data", "loss", "reference", "timesteps", "train")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not prefix and k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"config key `{key}`: expected a section of keys, got {v!r}")
            out.update(_flatten(v, key + "."))
        elif isinstance(v, dict) and key not in _mapping_keys():
            raise _unknown(key)
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`loss.beta=1000` -> ("loss.beta", 1000); the value is read as YAML (`a,b` lists allowed)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected KEY=VALUE, e.g. loss.beta=1000")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, type-check and validate."""
    flat: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: expected a mapping of keys at the top level")
        flat.update(_flatten(raw))
    for o in overrides:
        k, v = parse_override(o)
        flat[k] = v
    return from_flat(flat)


def from_flat(flat: dict[str, Any]) -> Config:
    types_by_key = {k: tp for k, _, tp in iter_fields()}
    cfg = Config()
    for key, value in rename_old_keys(flat).items():
        if key not in types_by_key:
            raise _unknown(key)
        section, _, name = key.rpartition(".")
        target = getattr(cfg, section) if section else cfg
        setattr(target, name, _coerce(key, value, types_by_key[key]))
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}`: {what}, got {value!r}")


def validate(cfg: Config) -> None:
    """Value checks beyond types: ranges and required keys; then the objective's own rules."""
    m, d, lo, t, r, ts = cfg.model, cfg.data, cfg.loss, cfg.train, cfg.reference, cfg.timesteps
    _require(
        bool(m.pretrained),
        "model.pretrained",
        "required (a diffusers pipeline folder or hub id)",
        m.pretrained,
    )
    _require(bool(d.path) or t.online, "data.path", "required (Pick-a-Pic v2 format pairs)", d.path)
    _require(bool(cfg.output_dir), "output_dir", "required", cfg.output_dir)
    _require(m.lora_rank >= 0, "model.lora_rank", "must be >= 0", m.lora_rank)
    _require(0 <= m.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)", m.lora_dropout)
    _require(
        d.resolution >= 8 and d.resolution % 8 == 0,
        "data.resolution",
        "must be a multiple of 8",
        d.resolution,
    )
    _require(0 <= d.prompt_dropout <= 1, "data.prompt_dropout", "must be in [0, 1]", d.prompt_dropout)
    _require(d.max_pairs >= 0, "data.max_pairs", "must be >= 0", d.max_pairs)
    names = DATA_COLUMNS[d.format]
    unknown = sorted(set(d.columns) - set(names))
    _require(
        not unknown,
        "data.columns",
        f"unknown name(s) {', '.join(unknown)}; with data.format={d.format} it maps {', '.join(names)} "
        "to the dataset's columns",
        d.columns,
    )
    _require(
        not (d.format == "images" and d.cache),
        "data.cache",
        "is not available with data.format=images (the cache holds pairs); leave data.cache empty",
        d.cache,
    )
    _require(
        not d.streaming or d.max_pairs > 0,
        "data.max_pairs",
        "must be > 0 with data.streaming=true (the number of usable rows to read)",
        d.max_pairs,
    )
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
    _require(
        not (d.cache and d.random_crop),
        "data.random_crop",
        "cannot be used with data.cache (a cached latent holds one crop); set data.random_crop=false",
        d.random_crop,
    )
    _require(lo.beta > 0, "loss.beta", "must be > 0", lo.beta)
    _require(lo.eta >= 0, "loss.eta", "must be >= 0", lo.eta)
    _require(lo.gamma >= 0, "loss.gamma", "must be >= 0", lo.gamma)
    _require(lo.n > 0, "loss.n", "must be > 0", lo.n)
    _require(0 < lo.alpha <= 1, "loss.alpha", "must be in (0, 1]", lo.alpha)
    _require(0 <= lo.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)", lo.label_smoothing)
    _require(lo.logratio_scale > 0, "loss.logratio_scale", "must be > 0", lo.logratio_scale)
    _require(
        not (lo.beta_schedule == "flow" and lo.error_space == "epsilon"),
        "loss.beta_schedule",
        "flow with loss.error_space=epsilon applies (1 - sigma)^2 twice (epsilon errors of a flow model are "
        "velocity errors times (1 - sigma)^2); use loss.error_space=native",
        lo.beta_schedule,
    )
    _require(lo.clamp > 0, "loss.clamp", "must be > 0", lo.clamp)
    _require(r.update_every >= 1, "reference.update_every", "must be >= 1", r.update_every)
    _require(r.max_divergence > 0, "reference.max_divergence", "must be > 0", r.max_divergence)
    _require(r.probe_size >= 1, "reference.probe_size", "must be >= 1", r.probe_size)
    _require(r.probe_draws >= 1, "reference.probe_draws", "must be >= 1", r.probe_draws)
    _require(
        not (m.lora_rank > 0 and r.strategy == "ema"),
        "reference.strategy",
        "ema with LoRA would average the factors A and B separately, which is not an average of the "
        "weights B A; use periodic, or a full fine-tune (model.lora_rank=0)",
        r.strategy,
    )
    validate_family(cfg)
    _require(ts.std > 0, "timesteps.std", "must be > 0", ts.std)
    _require(0 <= r.ema_decay < 1, "reference.ema_decay", "must be in [0, 1)", r.ema_decay)
    _require(ts.bins >= 1, "timesteps.bins", "must be >= 1", ts.bins)
    _require(0 < ts.gamma <= 1, "timesteps.gamma", "must be in (0, 1]", ts.gamma)
    _require(t.max_steps >= 1, "train.max_steps", "must be >= 1", t.max_steps)
    _require(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _require(t.grad_accum >= 1, "train.grad_accum", "must be >= 1", t.grad_accum)
    _require(t.learning_rate > 0, "train.learning_rate", "must be > 0", t.learning_rate)
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", t.warmup_steps)
    _require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0", t.max_grad_norm)
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0", t.checkpoint_every)
    _require(t.checkpoints_keep >= 0, "train.checkpoints_keep", "must be >= 0", t.checkpoints_keep)
    _require(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    _require(t.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1", t.max_nonfinite)
    _require(t.online_every >= 1, "train.online_every", "must be >= 1", t.online_every)
    _require(
        t.online_per_prompt >= 2, "train.online_per_prompt", "must be >= 2 (a pair)", t.online_per_prompt
    )
    _require(
        not t.online or (bool(t.online_prompts) and bool(t.online_scorer)),
        "train.online",
        "needs train.online_prompts and train.online_scorer",
        t.online,
    )
    _require(
        not (t.online and d.cache), "train.online", "on-policy pairs cannot come from data.cache", t.online
    )
    check_objective(cfg)


def check_objective(cfg: Config) -> None:
    """What the objective record declares: the data formats it trains on, soft labels for kept ties, a
    reference to update; then its own cross-field rules."""
    from xdpo.objectives import OBJECTIVES, get_objective

    lo, d = cfg.loss, cfg.data
    obj = get_objective(lo.objective)
    accepting = [o.name for o in OBJECTIVES.values() if d.format in o.data]
    _require(
        d.format in obj.data,
        "data.format",
        f"{d.format} needs loss.objective={' or '.join(accepting)}, not {obj.name}",
        d.format,
    )
    _require(
        d.ties == "drop" or obj.uses_labels,
        "data.ties",
        f"keep trains ties as soft labels, which loss.objective={obj.name} does not use; set data.ties=drop",
        d.ties,
    )
    _require(
        cfg.reference.strategy == "frozen" or obj.needs_reference,
        "reference.strategy",
        f"has no effect: loss.objective={obj.name} runs no reference model; leave it frozen",
        cfg.reference.strategy,
    )
    if obj.check is not None:
        obj.check(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_table() -> str:
    """Every key with its type, default and help (for `xdpo train --help` and the README)."""
    rows = []
    for key, f, tp in iter_fields():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append(f"  {key:<28} {_type_name(tp):<40} default {default!r}\n      {f.metadata['help']}")
    return "\n".join(rows)
