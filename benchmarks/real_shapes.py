"""Seconds per training step and peak GPU memory of the 2025 families' denoisers at their real shapes, random
weights in bf16, batch 1 pair: one line per model.

Each model is the real checkpoint's denoiser built from its published config (values below, from each hub
repository's transformer/config.json), with random weights; the step is xdpo's own `train_step` on the
latent-cache path (VAE posteriors and text conditions of the real shapes, random), so the family's latent
normalisation, packing, ids, masks and its `predict` run as in training: policy forward and backward on
[w; l], the reference forward (LoRA: adapters off; full: a bf16 frozen copy), Flow-DPO's loss, AdamW.
Full fine-tunes keep fp32 master weights under bf16 autocast, as xdpo's accelerate runs do; LoRA r 64 on
the attention q, k, v, out (the shipped configs'); gradient checkpointing on. Sizes: 1024 px images with
the text lengths the pipelines feed (Qwen-Image and Z-Image: a 128-token prompt; FLUX.2: 512 padded
tokens); Wan 2.1 1.3B: 33 frames of 480 x 480 (the shipped config).

    python benchmarks/real_shapes.py              # on one GPU, ~5 minutes on an H200
    python benchmarks/real_shapes.py --tiny       # the same code on tiny shapes on the CPU (a test runs it)

Peak GiB is `torch.cuda.max_memory_allocated` over building the model and its steps (weights, optimizer
state, activations), beside xdpo's estimate without activations (`xdpo.train.memory`).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

QWEN_IMAGE = {  # Qwen/Qwen-Image transformer/config.json
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56), "guidance_embeds": False,
}  # fmt: skip
FLUX2_DEV = {  # black-forest-labs/FLUX.2-dev transformer/config.json
    "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
    "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}  # fmt: skip
FLUX2_KLEIN_4B = {  # black-forest-labs/FLUX.2-klein-base-4B transformer/config.json
    **FLUX2_DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "guidance_embeds": False,
}  # fmt: skip
Z_IMAGE_TURBO = {  # Tongyi-MAI/Z-Image-Turbo transformer/config.json (ZImageTransformer2DModel's defaults)
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1024, 512, 512],
}  # fmt: skip
WAN21_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
}  # fmt: skip
SCHEDULERS = {  # each repository's scheduler/scheduler_config.json (xdpo.models.small.dit_components)
    "qwenimage": "QWEN_IMAGE_SCHEDULER", "flux2": "FLUX2_SCHEDULER", "flux2_klein": "FLUX2_SCHEDULER",
    "zimage": "ZIMAGE_SCHEDULER", "wan": "WAN_SCHEDULER",
}  # fmt: skip


def model_class(family: str) -> Any:
    import diffusers

    return getattr(diffusers, {"qwenimage": "QwenImageTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                               "flux2_klein": "Flux2Transformer2DModel", "zimage": "ZImageTransformer2DModel",
                               "wan": "WanTransformer3DModel"}[family])  # fmt: skip


def tiny(config: dict[str, Any], family: str) -> dict[str, Any]:
    """The same config at a tiny width and depth (the --tiny CPU path)."""
    if family == "zimage":
        return {**config, "dim": 32, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
                "cap_feat_dim": 16, "axes_dims": [4, 6, 6], "axes_lens": [64, 32, 32]}  # fmt: skip
    if family == "wan":
        return {**config, "num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 16, "freq_dim": 16,
                "ffn_dim": 32, "num_layers": 1}  # fmt: skip
    small = {"num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 16}
    if family == "qwenimage":
        return {**config, **small, "axes_dims_rope": (4, 6, 6)}
    return {
        **config,
        **small,
        "num_single_layers": 1,
        "timestep_guidance_channels": 32,
        "axes_dims_rope": (4, 4, 4, 4),
    }


# (label, family, config, LoRA rank, image side, frames, text tokens, valid tokens, text width)
RUNS = [
    ("Qwen-Image LoRA", "qwenimage", QWEN_IMAGE, 64, 1024, 0, 512, 128, 3584),
    ("FLUX.2-dev LoRA", "flux2", FLUX2_DEV, 64, 1024, 0, 512, 512, 15360),
    ("FLUX.2-klein-4B full", "flux2_klein", FLUX2_KLEIN_4B, 0, 1024, 0, 512, 512, 7680),
    ("FLUX.2-klein-4B LoRA", "flux2_klein", FLUX2_KLEIN_4B, 64, 1024, 0, 512, 512, 7680),
    ("Z-Image-Turbo full", "zimage", Z_IMAGE_TURBO, 0, 1024, 0, 512, 128, 2560),
    ("Z-Image-Turbo LoRA", "zimage", Z_IMAGE_TURBO, 64, 1024, 0, 512, 128, 2560),
    ("Wan2.1-T2V-1.3B full", "wan", WAN21_1_3B, 0, 480, 33, 512, 512, 4096),
    ("Wan2.1-T2V-1.3B LoRA", "wan", WAN21_1_3B, 64, 480, 33, 512, 512, 4096),
]


def vae_stub(family: str, device: torch.device) -> Any:
    """What `family.to_latents` reads of the VAE: its config (scaling and shift, per-channel statistics: the
    classes' defaults are the real checkpoints') and, for FLUX.2, the batch norm of its 4 x 32 channels."""
    import inspect

    import diffusers

    if family == "zimage":  # FLUX.1's VAE (Tongyi-MAI/Z-Image-Turbo vae/config.json)
        return SimpleNamespace(config=SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159))
    if family.startswith("flux2"):
        bn = torch.nn.BatchNorm2d(128, affine=False, eps=1e-4).to(device)
        return SimpleNamespace(bn=bn, config=SimpleNamespace(batch_norm_eps=1e-4))
    cls = diffusers.AutoencoderKLQwenImage if family == "qwenimage" else diffusers.AutoencoderKLWan
    params = inspect.signature(cls.__init__).parameters
    return SimpleNamespace(
        config=SimpleNamespace(**{k: params[k].default for k in ("latents_mean", "latents_std")})
    )


def run_one(label: str, family: str, config: dict, rank: int, side: int, frames: int, seq: int, valid: int,
            width: int, *, device: torch.device, steps: int, tiny_shapes: bool) -> str:  # fmt: skip
    from xdpo.config import load_config
    from xdpo.data.batch import Batch
    from xdpo.models.families import get_family
    from xdpo.models.load import add_lora
    from xdpo.models.noise import FlowProcess
    from xdpo.models.small import dit_components
    from xdpo.objectives import get_objective
    from xdpo.train.memory import estimate
    from xdpo.train.optim import make_optimizer
    from xdpo.train.reference import Reference
    from xdpo.train.setup import objective_params
    from xdpo.train.step import StepContext, train_step

    fam, cuda = get_family(family), device.type == "cuda"
    if tiny_shapes:
        config, side, frames, seq, valid = tiny(config, family), 32, (5 if frames else 0), 16, 8
        width = config.get("joint_attention_dim") or config.get("cap_feat_dim") or config.get("text_dim")
    over = ["model.pretrained=x", "data.path=x", f"model.lora_rank={rank}", "model.lora_alpha=128",
            "train.mixed_precision=bf16", "train.learning_rate=5e-6", "timesteps.sampling=logit_normal"]  # fmt: skip
    cfg = load_config(None, over)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    lora, t0 = rank > 0, time.perf_counter()
    torch.set_default_dtype(
        torch.bfloat16 if lora else torch.float32
    )  # LoRA: a bf16 base; full: fp32 masters
    try:
        with device:
            model = model_class(family).from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.enable_gradient_checkpointing()
    if lora:
        add_lora(model, cfg.model)
    model.train()
    est = estimate({"transformer": model}, "transformer", cfg)
    build_s = time.perf_counter() - t0

    vae = vae_stub(family, device)
    z = 32 if family.startswith("flux2") else 16  # the VAE's latent channels
    lat = 8 if tiny_shapes else side // 8  # every VAE here downsamples 8x
    depth = (
        ((frames - 1) // 4 + 1,) if frames else (1,) if family == "qwenimage" else ()
    )  # Wan: 4k + 1 frames
    shape = (2, z, *depth, lat, lat)  # the posterior of [w; l], as the cache holds it
    posterior = (torch.randn(shape, device=device), torch.full(shape, -4.0, device=device))
    text = torch.randn(1, seq, width, device=device, dtype=torch.bfloat16)
    cond: dict[str, torch.Tensor] = {"encoder_hidden_states": text}
    if family in ("qwenimage", "zimage"):
        mask = torch.arange(seq, device=device).unsqueeze(0) < valid
        cond["encoder_hidden_states_mask" if family == "qwenimage" else "encoder_attention_mask"] = (
            mask.long() if family == "qwenimage" else mask
        )
    if config.get("guidance_embeds"):
        cond["guidance"] = torch.full((1,), 4.0, device=device)
    batch = Batch(
        captions=["x"],
        label=torch.ones(1),
        pairs=True,
        pixel_size=(side, side),
        posterior=posterior,
        cond=cond,
    )

    scheduler = getattr(dit_components, SCHEDULERS[family])
    sched = (dit_components.unipc_scheduler if family == "wan" else dit_components.flow_match_scheduler)(
        scheduler
    )
    tokens = fam.image_tokens(lat, lat)  # the image tokens the pipeline's shift is computed for
    dynamic = sched.config.get("use_dynamic_shifting", False)
    mu = fam.shift_mu(tokens, sched.config, cfg.family) if dynamic and fam.shift_mu else None
    process = FlowProcess(sched, image_seq_len=tokens, mu=mu)
    objective = get_objective("pair")
    reference = Reference(cfg.reference, fam, model, lora=lora, dtype=torch.bfloat16, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.train, params, 5e-6)
    ctx = StepContext(
        comps=SimpleNamespace(family=fam, vae=vae), process=process, policy=model, reference=reference,
        objective=objective, params=objective_params(cfg, objective), timesteps=cfg.timesteps,
        autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16),
    )  # fmt: skip
    times = []
    for i in range(steps + 1):  # the first step warms up kernels and allocator
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with ctx.autocast():
            out = train_step(ctx, batch, torch.Generator(device).manual_seed(i))
        out.out.loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
        if not torch.isfinite(out.out.loss).all():
            raise RuntimeError(f"{label}: non-finite loss")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    parts = (
        sum(v for k, v in est.items() if not k.startswith("_") and k != "frozen VAE + text encoders") / 2**30
    )
    n = sum(p.numel() for p in model.parameters())
    del model, reference, opt, ctx, out
    gc.collect()
    return (
        f"{label:<22} {n / 1e9:6.2f}B params  {sorted(times)[len(times) // 2]:7.3f} s/step  peak {peak:6.1f} GiB  "
        f"(estimate {parts:6.1f} GiB without activations; built in {build_s:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (what the test runs)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up step)")
    ap.add_argument("--only", nargs="*", default=None, help="labels (substrings) of the models to run")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("real_shapes: no GPU; pass --tiny for the CPU path at tiny shapes", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    failed = 0
    for run in RUNS:
        if args.only and not any(o.lower() in run[0].lower() for o in args.only):
            continue
        try:
            print(run_one(*run, device=device, steps=args.steps, tiny_shapes=args.tiny), flush=True)
        except Exception as e:  # noqa: BLE001 - one line per model, whatever stopped it (an OOM is a result)
            failed += 1
            print(f"{run[0]:<22} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
