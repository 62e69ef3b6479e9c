"""A run's device-memory estimate from parameter counts: weights, gradients, optimizer state, reference.

Counts come from the loaded modules, or from the component configs instantiated on the meta device
(`xdpo train --dry-run`: nothing is read but configs). Bytes per value: fp32 4, fp16/bf16 2.
- denoiser: full fine-tune keeps fp32 master weights (P x 4); LoRA keeps the base in the mixed-precision
  dtype and the adapters in fp32 (P x w + T x 4); a quantised base (`model.quantize`) its Linear weights in
  1 (int8, fp8) or 0.516 (nf4, block scales included) bytes plus a scale per row
  (`xdpo.models.quantize.quantized_bytes`; a loaded quantised model: what it holds);
- gradients: T x 4; optimizer: AdamW 2 x T x 4, 8-bit AdamW 2 x T x 1, Adafactor the factored second
  moments (rows + columns of each matrix) x 4;
- reference: full fine-tune, a frozen copy in `model.reference_dtype` (+ the initial model for `periodic`,
  unless offloaded; `ema` keeps its copy in fp32), whole, divided by N when sharded (`reference.place=
  sharded` under FSDP2 / ZeRO-3), or one block plus the non-block rest on the device with the blocks in CPU
  memory (`reference.place=cpu`, reported apart); LoRA, nothing (adapters disabled) or a snapshot T x 4;
- frozen VAE and text encoders in the mixed-precision dtype (text encoders: `model.quantize_text_encoders`);
- sharding over N processes (`sharding=(mode, N)`): FSDP2 and ZeRO-3 divide the denoiser's weights,
  gradients and optimizer state by N, ZeRO-2 the gradients and optimizer state, ZeRO-1 the optimizer
  state. DeepSpeed keeps the model in the mixed-precision dtype (P x w) and fp32 master weights in its
  optimizer shards (T x 4 / N, counted there). The reference is sharded only with `reference.place=sharded`.
Activations depend on resolution, batch, attention kernels and gradient checkpointing and are not
estimated: measure them with `benchmarks/step_overhead.py` style runs at your sizes.
"""

from __future__ import annotations

from typing import Any

from xdpo.objectives import get_objective
from xdpo.train.reference import STRATEGIES

BYTES = {"no": 4, "fp32": 4, "fp16": 2, "bf16": 2}


def lora_count(model: Any, targets: list[str], rank: int) -> int:
    """Adapter parameters peft would add: r (in + out) per targeted Linear (module name ends with a target)."""
    import torch

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (mod.in_features + mod.out_features)
    return n


def adafactor_count(model: Any) -> int:
    n = 0
    for p in model.parameters():
        n += p.shape[0] + p[0].numel() if p.ndim >= 2 else p.numel()
    return n


def base_bytes(model: Any, quantize: str, w: int) -> float:
    """Bytes of a frozen model's weights: `w` each, or its Linear weights quantised (`model.quantize`); a
    model already quantised: what it holds."""
    from xdpo.models.quantize import footprint, quantized_bytes

    if getattr(model, "xdpo_quantized", None):
        return float(footprint(model))
    return quantized_bytes(model, quantize, w)


def meta_modules(pretrained: str, fam: Any, cfg: Any) -> dict[str, Any]:
    """The pipeline's denoiser, VAE and text encoders built from their configs on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from xdpo.models.load import read_model_index, resolve_pretrained

    path = resolve_pretrained(pretrained)
    index = read_model_index(pretrained, cfg.model.revision)
    wanted = [fam.denoiser, "vae"] + [k for k in index if k.startswith("text_encoder")]
    dropped = {k for k, v in fam.load_kwargs(cfg.family).items() if v is None}  # e.g. SD3 without T5
    wanted = [k for k in wanted if k not in dropped]
    out = {}
    with init_empty_weights():
        for name in wanted:
            lib, cls_name = index.get(name) or (None, None)
            if lib is None:
                continue
            if lib == "diffusers":
                cls = getattr(diffusers, cls_name)
                out[name] = cls.from_config(
                    cls.load_config(path, subfolder=name, revision=cfg.model.revision)
                )
            else:
                cls = getattr(transformers, cls_name)
                conf = cls.config_class.from_pretrained(path, subfolder=name, revision=cfg.model.revision)
                out[name] = cls(conf)
    return out


SHARDED = {  # mode -> which parts are divided by the number of processes
    "none": (),
    "fsdp": ("denoiser weights", "gradients", "optimizer state"),
    "zero1": ("optimizer state",),
    "zero2": ("gradients", "optimizer state"),
    "zero3": ("denoiser weights", "gradients", "optimizer state"),
}


def sharding_of(accelerator: Any) -> tuple[str, int]:
    """(mode, processes) of a prepared-to-be accelerator, for `estimate`."""
    from xdpo.train.distributed import deepspeed_stage, is_fsdp

    world, stage = accelerator.num_processes, deepspeed_stage(accelerator)
    if is_fsdp(accelerator):
        return "fsdp", world
    return ("none" if stage is None else f"zero{stage}"), world


def sharding_from_env() -> tuple[str, int]:
    """(mode, processes) from what `accelerate launch` exports (`xdpo train --dry-run` under it)."""
    import os

    from xdpo.train.distributed import deepspeed_requested, fsdp_requested

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp_requested():
        return "fsdp", world
    if deepspeed_requested():
        return f"zero{int(os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2'))}", world
    return "none", world


def estimate(
    modules: dict[str, Any], denoiser: str, cfg: Any, sharding: tuple[str, int] = ("none", 1)
) -> dict[str, float]:
    """Bytes by part per device (see the module docstring)."""
    t, m, r = cfg.train, cfg.model, cfg.reference
    w = BYTES[t.mixed_precision]
    den = modules[denoiser]
    p = sum(x.numel() for x in den.parameters())
    lora = m.lora_rank > 0
    trainable = lora_count(den, m.lora_targets, m.lora_rank) if lora else p
    adapter = ("lora_", "lokr_", "hada_")  # peft's LoRA / DoRA, LoKr, LoHa parameter names
    attached = (
        sum(x.numel() for n, x in den.named_parameters() if any(a in n for a in adapter)) if lora else 0
    )
    if attached:  # a loaded model with its adapters already attached
        trainable, p = attached, p - attached
    ref_b = w if m.reference_dtype == "auto" else BYTES[m.reference_dtype]
    opt = {"adamw": 8 * trainable, "adafactor": 4 * (adafactor_count(den) if not lora else trainable)}
    opt["adamw8bit"] = 2 * trainable
    strategy = STRATEGIES[r.strategy]
    host = 0.0  # bytes of the reference kept in CPU memory (reference.place=cpu)
    if not get_objective(cfg.loss.objective).needs_reference:
        ref = 0  # no reference forward, no copy (SFT, MaPO)
    elif lora:  # adapters off; a moving reference keeps an fp32 snapshot of the adapters
        ref = 4 * trainable if strategy.moves else 0
    else:  # a frozen copy (fp32 for an EMA), and the initial model's copy when the reference moves
        ref = (4 if strategy.full_precision else ref_b) * p
        ref, host = reference_copy(den, ref, p, getattr(r, "place", "device"), sharding)
        ref += ref_b * p if strategy.moves and not r.offload else 0
    frozen = sum(
        base_bytes(mod, m.quantize_text_encoders if k.startswith("text_encoder") else "none", w)
        for k, mod in modules.items()
        if k != denoiser
    )
    mode, world = sharding
    quantized = lora and m.quantize != "none"
    base = base_bytes(den, m.quantize, w) - (4 * attached if quantized else w * attached)
    out = {
        "denoiser weights": (base + 4 * trainable) if lora else 4 * p,
        "gradients": 4 * trainable,
        "optimizer state": opt.get(t.optimizer, 8 * trainable),
        "reference": ref,
        "frozen VAE + text encoders": frozen,
    }
    if (
        mode.startswith("zero") and w < 4 and not quantized
    ):  # a 16-bit model, fp32 master weights in the optimizer shards
        out["denoiser weights"] = (p + trainable) * w if lora else p * w
        out["gradients"] = w * trainable
        out["optimizer state"] += 4 * trainable
    for part in SHARDED[mode]:
        out[part] /= max(world, 1)
    return {**out, "_params": p, "_trainable": trainable, "_sharding": f"{mode} x {world}", "_host": host}


def reference_copy(
    den: Any, nbytes: float, p: int, place: str, sharding: tuple[str, int]
) -> tuple[float, float]:
    """(device bytes, CPU bytes) of a full fine-tune's reference copy of `nbytes` by `reference.place`: whole;
    streamed (the blocks in CPU memory, one block and the rest on the device); sharded over the processes
    under FSDP / ZeRO-3 (whole otherwise: a run refuses it there)."""
    mode, world = sharding
    if place == "sharded" and mode in ("fsdp", "zero3"):
        return nbytes / max(world, 1), 0.0
    if place == "cpu":
        from xdpo.train.reference.placement import blocks_of

        sizes = [sum(x.numel() for x in b.parameters()) for b in blocks_of(den)]
        per = nbytes / max(p, 1)
        return per * (p - sum(sizes) + max(sizes)), per * sum(sizes)
    return nbytes, 0.0


def format_estimate(est: dict[str, float]) -> str:
    parts = {k: v for k, v in est.items() if not k.startswith("_")}
    sharded = est.get("_sharding", "none x 1")
    total = sum(parts.values())
    unit, scale = ("GiB", 1024**3) if total >= 1024**3 else ("MiB", 1024**2)
    lines = [f"  {k:<28} {v / scale:9.2f} {unit}" for k, v in parts.items()]
    lines.append(f"  {'total (without activations)':<28} {total / scale:9.2f} {unit}")
    head = (
        f"Memory estimate per device ({est['_params']:,} denoiser parameters, {est['_trainable']:,} trained"
    )
    head += "):" if sharded.startswith("none") else f"; sharded: {sharded.replace('x', 'over')} processes):"
    if est.get("_host"):
        lines.append(
            f"  {'(reference in CPU memory)':<28} {est['_host'] / scale:9.2f} {unit}, not on the device"
        )
    return "\n".join([head, *lines, "  activations: not estimated (resolution, batch, checkpointing)"])
