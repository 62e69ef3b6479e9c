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

from xdpo.config.options import above, at_least, key, names, required, rule, within
from xdpo.config.sampling import OnlineConfig, ValidationConfig
from xdpo.config.sections import family_section, objective_sections


@dataclass
class ModelConfig:
    pretrained: str = key(
        "",
        "diffusers pipeline folder or hub id (SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1, Qwen-Image, FLUX.2 [dev], "
        "FLUX.2 [klein], Z-Image, Wan 2.x); "
        "`digits` / `digits-flow` = the shipped digits bases",
        **required("a diffusers pipeline folder or hub id"),
    )
    revision: str | None = key(None, "hub revision of `pretrained`")
    family: str = key(
        "auto",
        "model family; auto = read from model_index.json (_class_name)",
        choices=names("xdpo.models.families:families", "auto"),
    )
    vae: str = key("", "another VAE folder or hub id (e.g. SDXL's fp16-fix VAE); empty = the pipeline's")
    lora_rank: int = key(
        0, "LoRA rank on the denoiser's attention projections; 0 = full fine-tune", **at_least(0)
    )
    lora_alpha: float | None = key(None, "LoRA alpha; empty = lora_rank (scale 1)")
    lora_dropout: float = key(0.0, "LoRA dropout", **within(0, 1, "[)"))
    lora_targets: list[str] = key(
        ["to_q", "to_k", "to_v", "to_out.0"],
        "denoiser modules that get LoRA adapters (attention q, k, v, out)",
    )
    lora_type: Literal["lora", "dora", "lokr", "loha"] = key(
        "lora",
        "adapter kind (peft): lora; dora = LoRA with magnitude and direction apart (Liu et al. 2024); lokr, "
        "loha = LyCORIS' Kronecker / Hadamard products",
    )
    lora_text_encoder: bool = key(
        False,
        "LoRA (of model.lora_type, rank and alpha) also on the family's text encoders (CLIP attention: SD 1.x, "
        "SDXL, SD3, Flux); encodings then carry gradients each step (no data.cache)",
    )
    lora_text_encoder_lr: float | None = key(
        None,
        "learning rate of the text encoders' LoRA (scaled as train.learning_rate); empty = train.learning_rate",
        **rule(lambda v: v is None or v > 0, "must be > 0 (or empty)"),
    )
    quantize: Literal["none", "int8", "nf4", "fp8"] = key(
        "none",
        "LoRA runs: the frozen denoiser's Linear weights in int8 or nf4 (bitsandbytes) or fp8 (float8 e4m3); "
        "the reference (adapters off) shares them",
    )
    quantize_text_encoders: Literal["none", "int8", "nf4", "fp8"] = key(
        "none", "the frozen text encoders' Linear weights in int8, nf4 or fp8 (as model.quantize)"
    )
    gradient_checkpointing: bool = key(False, "trade compute for memory in the denoiser")
    reference_dtype: Literal["auto", "fp32", "fp16", "bf16"] = key(
        "auto", "dtype of the frozen reference denoiser (full fine-tune); auto = the mixed-precision dtype"
    )


DATA_COLUMNS = {"pairs": ("caption", "jpg_0", "jpg_1", "label_0"), "images": ("image", "caption", "label")}
"""xdpo's column names per `data.format` (what `data.columns` maps to the dataset's own names)."""


@dataclass
class DataConfig:
    path: str = key(
        "",
        "parquet file/glob/folder, save_to_disk folder, webdataset .tar shards (folder, glob or comma list), "
        "or hub id",
    )
    split: str = key("train", "split of a DatasetDict folder or hub dataset")
    format: Literal["pairs", "images"] = key(
        "pairs",
        "pairs = (caption, preferred, dispreferred) rows; images = (image, caption, label 1 desirable / "
        "0 undesirable) rows, Diffusion-KTO's data (loss.objective=kto), or winner-only rows (loss.objective=seppo)",
    )
    columns: dict[str, str] = key(
        {},
        "xdpo name -> the dataset's column, e.g. caption:prompt,jpg_0:chosen,jpg_1:rejected (pairs: caption, "
        "jpg_0, jpg_1, label_0; images: image, caption, label); without label_0, jpg_0 is preferred; without label, "
        "every image is preferred (winner-only data, e.g. image:chosen,caption:prompt for loss.objective=seppo)",
    )
    streaming: bool = key(
        False,
        "read data.path with load_dataset(streaming=True), keeping only the first data.max_pairs usable rows "
        "(kept in an Arrow file in the datasets cache): a subset without downloading everything",
    )
    resolution: int = key(
        512,
        "square training resolution in pixels (resize shorter side, then crop)",
        **rule(lambda v: v >= 8 and v % 8 == 0, "must be a multiple of 8"),
    )
    buckets: list[str] = key(
        [],
        "aspect-ratio buckets: WxH resolutions (e.g. 1024x1024,1152x896,896x1152), or auto (sides multiples of "
        "data.bucket_step, area <= data.resolution^2, ratio 1:4 to 4:1); each pair trains at the bucket "
        "nearest its images' shape, batches within a bucket; empty = square data.resolution crops",
    )
    bucket_step: int = key(64, "data.buckets=auto: bucket sides are multiples of this", **at_least(8))
    ties: Literal["drop", "keep"] = key(
        "drop",
        "label_0 = 0.5 rows: drop (Diffusion-DPO) or keep as soft targets (label 0.5; objectives that use labels)",
    )
    prompt_dropout: float = key(
        0.0, "probability of an empty caption (Diffusion-DPO used 0.2)", **within(0, 1)
    )
    flip: Literal["none", "pair", "independent"] = key(
        "none", "horizontal flips: none, both images alike, or each"
    )
    random_crop: bool = key(False, "random instead of center crop (same offsets for both images)")
    num_frames: int = key(
        0,
        "video families (Wan): frames per clip sampled from each video (4k + 1 for Wan's VAE); 0 = images",
        **at_least(0),
    )
    fps: float = key(
        0.0,
        "video families: the rate frames are sampled at from a video file (Wan 2.1: 16); 0 = the file's "
        "own, consecutive frames (a frame folder is read as consecutive frames)",
        **at_least(0),
    )
    max_pairs: int = key(
        0,
        "use only the first N pairs (images with data.format=images) after dropping ties and bad rows; "
        "0 = all; with data.streaming only these rows are read",
        **at_least(0),
    )
    num_workers: int = key(0, "DataLoader worker processes for JPEG decoding and transforms", **at_least(0))
    on_bad_row: Literal["error", "skip"] = key(
        "error", "a bad row (label, caption, image): stop with one line naming it, or leave it out and report"
    )
    cache: str = key(
        "",
        "folder of VAE posteriors and text conditions written by `xdpo cache`; train reads them instead of "
        "encoding images and captions each step; empty = no cache",
    )
    sample_posterior: bool = key(
        True, "latents sampled from the VAE posterior each step (Diffusion-DPO); false = its mean"
    )


@dataclass
class LossConfig:
    objective: str = key(
        "pair",
        "pair = preference loss on (w, l); sft = denoising loss on w; kto = Diffusion-KTO per image",
        choices=names("xdpo.objectives:OBJECTIVES"),
    )
    divergence: str = key(
        "reverse_kl",
        "reward transform f'(z): reverse_kl = Diffusion-DPO; xdpo = xDPO Appendix C form",
        choices=names("xdpo.objectives:DIVERGENCES"),
    )
    outer: str = key("sigmoid", "outer loss over the logits", choices=names("xdpo.objectives:OUTER_LOSSES"))
    beta: float = key(5000.0, "regularisation strength (Diffusion-DPO 5000, xDPO 1000)", **above(0))
    eta: float = key(0.05, "xDPO: weight of the KL term (paper 0.05)", **at_least(0))
    gamma: float = key(1 / 6, "xDPO: weight of the higher-order term (paper 1/6)", **at_least(0))
    n: float = key(6.0, "xDPO: order of the higher-order term (paper 6)", **above(0))
    alpha: float = key(0.5, "alpha divergence: alpha in (0, 1]", **within(0, 1, "(]"))
    label_smoothing: float = key(
        0.0,
        "sigmoid: conservative-DPO smoothing; robust: assumed label-flip rate",
        **within(0, 0.5, "[)"),
    )
    logratio_scale: float = key(1.0, "s in log z = -s (e_theta - e_ref)", **above(0))
    clamp: float = key(
        50.0, "clamp of exponent arguments |.| in the divergences (logged as clamp_fraction)", **above(0)
    )
    error_reduction: Literal["mean", "sum"] = key(
        "mean", "per-sample error: mean over C,H,W (Diffusion-DPO) or sum (xDPO appendix; overflows)"
    )
    error_space: Literal["native", "epsilon"] = key(
        "native",
        "errors of the model's own prediction (eps, v, x0, flow velocity) or converted to noise predictions",
    )
    beta_schedule: Literal["constant", "flow"] = key(
        "constant", "flow models: constant beta (Flow-DPO), or beta (1 - sigma)^2 (derived, reward-hacks)"
    )


@dataclass
class ReferenceConfig:
    strategy: str = key(
        "frozen",
        "frozen = the initial model; stable = Kang et al. 2025's guarded update (hard copy by default; alpha, "
        "anchor); periodic = its earlier form (pred_mse guard); ema; soft = the online methods' old policy "
        "(DiffusionNFT, AWM, DGPO: eta ramped in optimizer steps); checkpoints = SePPO's previous checkpoints of "
        "the policy (the objective's section picks one, e.g. seppo.select)",
        choices=names("xdpo.train.reference:STRATEGIES"),
    )
    update_every: int = key(
        32, "tau: optimizer steps between reference updates (stable, periodic, ema)", **at_least(1)
    )
    alpha: float = key(
        1.0,
        "stable: ref <- (1 - alpha) ref + alpha policy every tau steps; 1 = Kang et al.'s copy (< 1: xdpo's "
        "extension, full fine-tunes only)",
        **within(0, 1, "(]"),
    )
    anchor: float = key(
        0.0,
        "stable: kappa, then ref <- ref + kappa (initial - ref); 0 = Kang et al. (who have none; xdpo's extension)",
        **within(0, 1, "[)"),
    )
    max_divergence: float = key(
        0.005,
        "delta: estimated divergence D of the candidate from the initial model beyond which the reference "
        "freezes (stable, periodic; Kang et al.: 0.005 SD1.5, 0.002 SDXL, in `kang` units)",
        **above(0),
    )
    on_exceed: Literal["freeze", "reinit"] = key(
        "freeze",
        "stable/periodic, D > delta: freeze the reference for good, or reset it to the initial model",
    )
    probe_size: int = key(
        32, "preferred images drawn once from the data on which the divergence is estimated", **at_least(1)
    )
    probe_draws: int = key(4, "(t, eps) draws per probe image for each divergence estimate", **at_least(1))
    divergence: Literal["auto", "kang", "pred_mse", "error_gap"] = key(
        "auto",
        "D: kang = T x mean (e - e_initial) on the preferred images (Kang et al. Eq. 8), pred_mse = mean "
        "(pred - pred_initial)^2, error_gap = e - e_initial; auto = kang for stable, pred_mse for periodic",
    )
    ema_decay: float = key(
        0.99,
        "ema: ref <- decay * ref + (1 - decay) * policy every update_every steps",
        **within(0, 1, "[)"),
    )
    offload: bool = key(
        False,
        "full fine-tune with reference.strategy=stable/periodic: keep the initial-model copy on the CPU (ema "
        "has none)",
    )
    soft_rate: float = key(
        0.001,
        "soft: ref <- eta ref + (1 - eta) policy every update_every steps, eta = min(soft_rate * step, soft_max) "
        "(DiffusionNFT's old policy: 0.001, 0.5; AWM's and DGPO's EMA: 0.001, 0.3)",
        **at_least(0),
    )
    soft_max: float = key(
        0.5, "soft: the largest eta (DiffusionNFT 0.5; AWM, DGPO 0.3)", **within(0, 1, "[)")
    )
    place: Literal["device", "cpu", "sharded"] = key(
        "device",
        "full fine-tune: the reference copy whole on each device; on the CPU, each block's weights copied in for "
        "its forward; or sharded over the processes like the policy (FSDP2 / ZeRO-3; reference.strategy=frozen)",
    )


@dataclass
class TimestepConfig:
    sampling: Literal["auto", "uniform", "skewed", "logit_normal"] = key(
        "auto",
        "auto = uniform (UNet families, Diffusion-DPO) or logit_normal (flow families, SD3); "
        "skewed = toward noisy t (Kang et al. 2025)",
    )
    mean: float = key(0.0, "logit_normal: location m of u = sigmoid(m + s n)")
    std: float = key(1.0, "logit_normal: scale s", **above(0))
    bins: int = key(
        10,
        "skewed: K equal bins over [0, T) (Kang et al. leave K open; 50 = DenseReward's grid)",
        **at_least(1),
    )
    gamma: float = key(
        0.9,
        "skewed: bin k (k = 0 the noisiest) drawn with probability proportional to gamma^k",
        **within(0, 1, "(]"),
    )
    weighting: Literal["constant", "snr", "dense"] = key(
        "constant",
        "constant; snr = lambda(t) = 1 + minmax(1/sqrt(SNR(t))) in [1, 2] multiplying beta (Kang et al. 2025; "
        "flow models: 1 + minmax(sigma)); dense = DenseReward's discount gamma^k over 50 sampler steps as a "
        "loss weight, mean 1 under uniform t",
    )
    normalize: bool = key(
        False,
        "divide the weight by its mean under the configured sampler (the effective beta unchanged); "
        "false = the papers' weights",
    )
    discount: float = key(
        0.9, "dense: gamma, the discount per sampler step (DenseReward 0.9)", **within(0, 1, "(]")
    )


@dataclass
class TrainConfig:
    max_steps: int = key(2000, "optimizer steps", **at_least(1))
    batch_size: int = key(1, "pairs per device per micro-step", **at_least(1))
    grad_accum: int = key(1, "micro-steps per optimizer step", **at_least(1))
    learning_rate: float = key(
        1e-8, "base learning rate (multiplied by the effective batch if scale_lr)", **above(0)
    )
    scale_lr: bool = key(True, "lr x batch_size x grad_accum x processes, as Diffusion-DPO does")
    warmup_steps: int = key(500, "linear warmup steps, then constant", **at_least(0))
    max_grad_norm: float = key(1.0, "gradient clipping; 0 = off", **at_least(0))
    mixed_precision: Literal["no", "fp16", "bf16"] = key("no", "autocast dtype for forward passes")
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = key(
        "adamw", "AdamW (torch, foreach), 8-bit AdamW (bitsandbytes: 1/4 of AdamW's state) or Adafactor"
    )
    weight_decay: float = key(1e-2, "AdamW weight decay")
    adam_beta1: float = key(0.9, "AdamW beta1")
    adam_beta2: float = key(0.999, "AdamW beta2")
    adam_epsilon: float = key(1e-8, "AdamW epsilon")
    checkpoint_every: int = key(
        500, "save a resumable checkpoint every N steps; 0 = only at the end", **at_least(0)
    )
    checkpoints_keep: int = key(2, "keep the newest N checkpoints; 0 = keep all", **at_least(0))
    resume_from: str = key("", "`latest`, a checkpoint folder, or empty for a fresh start")
    report_to: Literal["none", "tensorboard", "wandb"] = key("none", "accelerate tracker for metrics")
    log_every: int = key(
        1, "progress-bar refresh every N steps (metrics.jsonl has every step)", **at_least(1)
    )
    nonfinite: Literal["stop", "skip"] = key(
        "stop", "non-finite loss: stop the run (weights untouched), or skip the step and count it"
    )
    max_nonfinite: int = key(10, "skip: stop after this many non-finite steps in a row", **at_least(1))
    ema_decay: float = key(
        0.0,
        "EMA of the trained weights (diffusers' EMAModel) saved as final-ema/ beside final/; 0 = none",
        **within(0, 1, "[)"),
    )
    noise_offset: float = key(
        0.0,
        "noise + offset * n, n ~ N(0, 1) per image and channel (as diffusers' training scripts); 0 = none",
        **at_least(0),
    )
    log_deltas: bool = key(
        False, "also log every image's delta (policy minus reference error) per step in metrics.jsonl"
    )
    timestep_buckets: int = key(
        4,
        "implicit accuracy and reward margin per bucket of timesteps (t<lo>-<hi> in metrics.jsonl); 0 = off",
        **at_least(0),
    )
    chance_warning_steps: int = key(
        300,
        "warn once if the implicit accuracy is still at chance after this many steps (beta, lr); 0 = never",
        **at_least(0),
    )


@dataclass
class Config:
    output_dir: str = key(
        "outputs/xdpo-run", "where config.yaml, metrics.jsonl, checkpoints/ and final/ go", **required()
    )
    seed: int = key(0, "seed for data order, timesteps, noise and augmentation")
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
    validation: ValidationConfig = field(default_factory=ValidationConfig)
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
