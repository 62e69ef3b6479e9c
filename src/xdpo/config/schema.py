"""The run configuration's schema: one dataclass per section, every key with a default and a help line.

A key's field metadata says the rest of what the config knows about it: `check`/`rule` (its range, one
line naming the key when broken), `choices` (its values read from a registry: `options.names`),
`formerly` (its old name, still read with a deprecation line). Two kinds of sections are declared by
components: `family` (the families' options) and one section per objective that declares options
(`sections`, e.g. `mapo.*`), both built from the registries on first use (`xdpo.config.sections`).
Rules across keys live with the components they constrain (`xdpo.config.rules.RULE_OWNERS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from xdpo.config.options import above, at_least, names, required, rule, within
from xdpo.config.sections import family_section, objective_sections


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
        **required("a diffusers pipeline folder or hub id"),
    )
    revision: str | None = _f(None, "hub revision of `pretrained`")
    family: str = _f(
        "auto",
        "model family; auto = read from model_index.json (_class_name)",
        choices=names("xdpo.models.families:families", "auto"),
    )
    vae: str = _f("", "another VAE folder or hub id (e.g. SDXL's fp16-fix VAE); empty = the pipeline's")
    lora_rank: int = _f(
        0, "LoRA rank on the denoiser's attention projections; 0 = full fine-tune", **at_least(0)
    )
    lora_alpha: float | None = _f(None, "LoRA alpha; empty = lora_rank (scale 1)")
    lora_dropout: float = _f(0.0, "LoRA dropout", **within(0, 1, "[)"))
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
    resolution: int = _f(
        512,
        "square training resolution in pixels (resize shorter side, then crop)",
        **rule(lambda v: v >= 8 and v % 8 == 0, "must be a multiple of 8"),
    )
    ties: Literal["drop", "keep"] = _f(
        "drop",
        "label_0 = 0.5 rows: drop (Diffusion-DPO) or keep as soft targets (label 0.5; objectives that use labels)",
    )
    prompt_dropout: float = _f(
        0.0, "probability of an empty caption (Diffusion-DPO used 0.2)", **within(0, 1)
    )
    flip: Literal["none", "pair", "independent"] = _f(
        "none", "horizontal flips: none, both images alike, or each"
    )
    random_crop: bool = _f(False, "random instead of center crop (same offsets for both images)")
    num_frames: int = _f(
        0,
        "video families (Wan): frames per clip sampled from each video (4k + 1 for Wan's VAE); 0 = images",
        **at_least(0),
    )
    fps: float = _f(
        0.0,
        "video families: the rate frames are sampled at from a video file (Wan 2.1: 16); 0 = the file's "
        "own, consecutive frames (a frame folder is read as consecutive frames)",
        **at_least(0),
    )
    max_pairs: int = _f(
        0,
        "use only the first N pairs (images with data.format=images) after dropping ties and bad rows; "
        "0 = all; with data.streaming only these rows are read",
        **at_least(0),
    )
    num_workers: int = _f(0, "DataLoader worker processes for JPEG decoding and transforms", **at_least(0))
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
    objective: str = _f(
        "pair",
        "pair = preference loss on (w, l); sft = denoising loss on w; kto = Diffusion-KTO per image",
        choices=names("xdpo.objectives:OBJECTIVES"),
    )
    divergence: str = _f(
        "reverse_kl",
        "reward transform f'(z): reverse_kl = Diffusion-DPO; xdpo = xDPO Appendix C form",
        choices=names("xdpo.objectives:DIVERGENCES"),
    )
    outer: str = _f("sigmoid", "outer loss over the logits", choices=names("xdpo.objectives:OUTER_LOSSES"))
    beta: float = _f(5000.0, "regularisation strength (Diffusion-DPO 5000, xDPO 1000)", **above(0))
    eta: float = _f(0.05, "xDPO: weight of the KL term (paper 0.05)", **at_least(0))
    gamma: float = _f(1 / 6, "xDPO: weight of the higher-order term (paper 1/6)", **at_least(0))
    n: float = _f(6.0, "xDPO: order of the higher-order term (paper 6)", **above(0))
    alpha: float = _f(0.5, "alpha divergence: alpha in (0, 1]", **within(0, 1, "(]"))
    label_smoothing: float = _f(
        0.0,
        "sigmoid: conservative-DPO smoothing; robust: assumed label-flip rate",
        **within(0, 0.5, "[)"),
    )
    logratio_scale: float = _f(1.0, "s in log z = -s (e_theta - e_ref)", **above(0))
    clamp: float = _f(
        50.0, "clamp of exponent arguments |.| in the divergences (logged as clamp_fraction)", **above(0)
    )
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
    strategy: str = _f(
        "frozen",
        "frozen = the initial model; periodic = Kang et al. 2025 stable update; ema",
        choices=names("xdpo.train.reference:STRATEGIES"),
    )
    update_every: int = _f(
        32, "tau: optimizer steps between reference updates (periodic, ema)", **at_least(1)
    )
    max_divergence: float = _f(
        0.005,
        "delta: estimated divergence from the initial model beyond which the reference freezes (periodic)",
        **above(0),
    )
    on_exceed: Literal["freeze", "reinit"] = _f(
        "freeze",
        "periodic, divergence > delta: freeze the reference for good, or reset it to the initial model",
    )
    probe_size: int = _f(
        32, "preferred images drawn once from the data on which the divergence is estimated", **at_least(1)
    )
    probe_draws: int = _f(4, "(t, eps) draws per probe image for each divergence estimate", **at_least(1))
    divergence: Literal["pred_mse", "error_gap"] = _f(
        "pred_mse", "divergence estimate: mean (pred - pred_initial)^2, or e - e_initial (signed)"
    )
    ema_decay: float = _f(
        0.99,
        "ema: ref <- decay * ref + (1 - decay) * policy every update_every steps",
        **within(0, 1, "[)"),
    )
    offload: bool = _f(
        False,
        "full fine-tune with reference.strategy=periodic: keep the initial-model copy on the CPU (ema has none)",
    )
    place: Literal["device", "cpu", "sharded"] = _f(
        "device",
        "full fine-tune: the reference copy whole on each device; on the CPU, each block's weights copied in for "
        "its forward; or sharded over the processes like the policy (FSDP2 / ZeRO-3; reference.strategy=frozen)",
    )


@dataclass
class TimestepConfig:
    sampling: Literal["auto", "uniform", "skewed", "logit_normal"] = _f(
        "auto",
        "auto = uniform (UNet families, Diffusion-DPO) or logit_normal (flow families, SD3); "
        "skewed = toward noisy t (Kang et al. 2025)",
    )
    mean: float = _f(0.0, "logit_normal: location m of u = sigmoid(m + s n)")
    std: float = _f(1.0, "logit_normal: scale s", **above(0))
    bins: int = _f(10, "skewed: number of equal bins over [0, T)", **at_least(1))
    gamma: float = _f(
        0.9,
        "skewed: bin k (k = 0 the noisiest) drawn with probability proportional to gamma^k",
        **within(0, 1, "(]"),
    )
    weighting: Literal["constant", "snr"] = _f(
        "constant",
        "lambda(t) multiplying beta: 1, or 1 + minmax(1/sqrt(SNR(t))) in [1, 2] (Kang et al. 2025; flow "
        "models: 1 + minmax(sigma))",
    )


@dataclass
class TrainConfig:
    max_steps: int = _f(2000, "optimizer steps", **at_least(1))
    batch_size: int = _f(1, "pairs per device per micro-step", **at_least(1))
    grad_accum: int = _f(1, "micro-steps per optimizer step", **at_least(1))
    learning_rate: float = _f(
        1e-8, "base learning rate (multiplied by the effective batch if scale_lr)", **above(0)
    )
    scale_lr: bool = _f(True, "lr x batch_size x grad_accum x processes, as Diffusion-DPO does")
    warmup_steps: int = _f(500, "linear warmup steps, then constant", **at_least(0))
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 = off", **at_least(0))
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "autocast dtype for forward passes")
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = _f(
        "adamw", "AdamW (torch, foreach), 8-bit AdamW (bitsandbytes: 1/4 of AdamW's state) or Adafactor"
    )
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    checkpoint_every: int = _f(
        500, "save a resumable checkpoint every N steps; 0 = only at the end", **at_least(0)
    )
    checkpoints_keep: int = _f(2, "keep the newest N checkpoints; 0 = keep all", **at_least(0))
    resume_from: str = _f("", "`latest`, a checkpoint folder, or empty for a fresh start")
    report_to: Literal["none", "tensorboard", "wandb"] = _f("none", "accelerate tracker for metrics")
    log_every: int = _f(1, "progress-bar refresh every N steps (metrics.jsonl has every step)", **at_least(1))
    nonfinite: Literal["stop", "skip"] = _f(
        "stop", "non-finite loss: stop the run (weights untouched), or skip the step and count it"
    )
    max_nonfinite: int = _f(10, "skip: stop after this many non-finite steps in a row", **at_least(1))
    log_deltas: bool = _f(
        False, "also log every image's delta (policy minus reference error) per step in metrics.jsonl"
    )


@dataclass
class OnlineConfig:
    enabled: bool = _f(
        False,
        "online DPO: every online.every steps, new pairs sampled from the policy and scored",
        formerly="train.online",
    )
    every: int = _f(
        40,
        "optimizer steps per round (flow_grpo's online DPO regenerates every ~40)",
        formerly="train.online_every",
        **at_least(1),
    )
    prompts: str = _f(
        "",
        "prompt set or file the pairs are sampled for (as `xdpo pairs --prompts`)",
        formerly="train.online_prompts",
    )
    per_prompt: int = _f(
        4,
        "images sampled per prompt each round",
        formerly="train.online_per_prompt",
        **rule(lambda v: v >= 2, "must be >= 2 (a pair)"),
    )
    scorer: str = _f("", "reward that labels them (as `xdpo pairs --scorer`)", formerly="train.online_scorer")
    min_gap: float | None = _f(
        None,
        "keep every pair with a score gap above this; empty = best vs worst",
        formerly="train.online_min_gap",
    )
    sample_steps: int = _f(
        0, "sampling steps; 0 = the model's sampling defaults", formerly="train.online_sample_steps"
    )


@dataclass
class Config:
    output_dir: str = _f(
        "outputs/xdpo-run", "where config.yaml, metrics.jsonl, checkpoints/ and final/ go", **required()
    )
    seed: int = _f(0, "seed for data order, timesteps, noise and augmentation")
    model: ModelConfig = field(default_factory=ModelConfig)
    family: Any = field(
        default_factory=lambda: family_section()(),
        metadata={"section": family_section, "help": "the model family's own keys"},
    )
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    sections: dict[str, Any] = field(
        default_factory=lambda: {name: cls() for name, cls in objective_sections().items()},
        metadata={"sections": objective_sections, "help": "the objectives' own keys"},
    )

    def __getattr__(self, name: str) -> Any:
        """`cfg.<objective>`: the section of an objective that declares options (e.g. `cfg.mapo`)."""
        found = self.__dict__.get("sections", {})
        if name.startswith("__") or name not in found:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return found[name]
