"""Memory of a Flux transformer's weights with a quantised base (`model.quantize`): measured against bf16.

  python benchmarks/quantize_memory.py                      # the tiny Flux of the tests, on the CPU
  python benchmarks/quantize_memory.py --shape flux-dev --device cuda   # FLUX.1-dev's shape, random weights

For each mode the model is built in bf16 with random weights (N(0, 0.02)), quantised by
`xdpo.models.quantize.quantize_model` onto the device and measured: the bytes its parameters and buffers
hold (`footprint`, bitsandbytes' scales included), on CUDA also `torch.cuda.memory_allocated`; next to
it the estimate `xdpo train --dry-run` prints (`quantized_bytes`). Then LoRA (r 16 on the attention
projections) is attached and one forward and backward pass run, to show the base trains as it is. Prints
one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

FLUX_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
TINY = {
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}  # fmt: skip


def build(config: dict) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")  # allocated in bf16 at once
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.requires_grad_(False)


def step(model: torch.nn.Module, config: dict, device: str) -> float:
    """One LoRA forward + backward on 256 image and 64 text tokens; returns its seconds."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    kw = {"device": device, "dtype": torch.bfloat16}
    t0 = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        out = model(
            hidden_states=torch.randn(1, 256, config["in_channels"], **kw),
            encoder_hidden_states=torch.randn(1, 64, config["joint_attention_dim"], **kw),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], **kw),
            timestep=torch.tensor([0.5], **kw),
            img_ids=torch.zeros(256, 3, **kw),
            txt_ids=torch.zeros(64, 3, **kw),
            guidance=torch.tensor([3.5], **kw) if config["guidance_embeds"] else None,
        ).sample
        out.float().pow(2).mean().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    from xdpo.models.quantize import footprint, quantize_model, quantized_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("tiny", "flux-dev"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="none,int8,nf4,fp8")
    args = ap.parse_args()
    config = FLUX_DEV if args.shape == "flux-dev" else TINY
    cuda = args.device.startswith("cuda")
    bf16 = None
    for mode in args.modes.split(","):
        model = build(config)
        params = sum(p.numel() for p in model.parameters())
        estimate = quantized_bytes(model, mode, 2)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        quantize_model(model, mode, args.device, torch.bfloat16)
        seconds = time.perf_counter() - t0
        held = footprint(model)
        bf16 = held if mode == "none" else bf16
        row = {"shape": args.shape, "mode": mode, "params": params, "bytes": held, "estimate": estimate,
               "quantise_s": round(seconds, 1)}  # fmt: skip
        if cuda:
            row["cuda_allocated"] = torch.cuda.memory_allocated() - before
        if bf16:
            row["ratio_to_bf16"] = round(held / bf16, 4)
        row["lora_step_s"] = round(step(model, config, args.device), 2)
        if cuda:
            row["cuda_peak_step"] = torch.cuda.max_memory_allocated() - before
        print(json.dumps(row), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
