"""Training-loop memory of LoRA over a full fine-tune, on an SD 1.5-shaped UNet with random weights.

Loop memory = peak RSS during `xdpo train` minus the RSS once the models are loaded (policy, reference,
VAE, text encoder; every page of their weights read once, since `from_pretrained` leaves them memory-mapped
and a first forward would otherwise count them): gradients, optimizer state (and AdamW's foreach
temporaries), activations. Each mode
runs in a fresh process; the peak is the kernel's own high-water mark (VmHWM), reset right after the
models are loaded (/proc/self/clear_refs), so loading's transient peaks do not count. Linux only.

The UNet is SD 1.5's configuration (cache_speedup.py's builder) with `block_out_channels` scaled down
when a full fine-tune at full width would not fit: the script takes the widest of (320, 640, 1280, 1280),
(256, ...), (192, ...), (128, ...) whose estimated full fine-tune peak (weights, reference, gradients,
AdamW's two moments and one foreach temporary: 6 x 4 bytes per parameter) fits in --budget-gib.
Target (issue 9): LoRA / full <= 0.6.

    python benchmarks/memory_lora_vs_full.py [--resolution 128] [--steps 2] [--lora 4] [--budget-gib 12]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WIDTHS = [(320, 640, 1280, 1280), (256, 512, 1024, 1024), (192, 384, 768, 768), (128, 256, 512, 512)]
SD15_UNET_PARAMS = 859_520_964  # runwayml/stable-diffusion-v1-5's UNet
BYTES_PER_PARAM_FULL = 6 * 4  # fp32 weights, reference, gradients, exp_avg, exp_avg_sq, foreach sqrt


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def resident(modules: list) -> None:
    """Read one value per 4 KiB page of every weight: what `from_pretrained` left memory-mapped from the
    safetensors files (not yet in RSS) becomes resident now, not during the first step."""
    import torch

    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                if t.numel():
                    t.detach().reshape(-1)[:: max(4096 // t.element_size(), 1)].sum()


def child(args: argparse.Namespace) -> None:
    """One mode in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    from xdpo.config import load_config
    from xdpo.train import checkpoint, recipe, setup

    marks: dict[str, int] = {}
    real = setup.load_models

    def measured(cfg: Any, device: Any, objective: Any) -> Any:
        models = real(cfg, device, objective)
        comps, storage = models.comps, models.reference.storage
        parts = [
            comps.denoiser,
            comps.vae,
            *comps.text_encoders.values(),
            getattr(storage, "ref_model", None),
            getattr(storage, "init_model", None),
        ]
        resident([m for m in parts if m is not None])
        gc.collect()
        marks["loaded"] = status_kib("VmRSS")
        marks["trained"] = sum(p.numel() for p in models.params)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
        return models

    setup.load_models = measured
    cfg = load_config(
        None,
        [
            f"model.pretrained={args.pipe}", f"data.path={args.pairs}", f"data.resolution={args.resolution}",
            f"output_dir={args.out}", f"train.max_steps={args.steps}", "train.batch_size=1",
            "train.checkpoint_every=0", "train.learning_rate=1e-6", "train.scale_lr=false", "train.warmup_steps=0",
            f"model.lora_rank={args.lora if args.child == 'lora' else 0}", "data.max_pairs=4",
        ],
    )  # fmt: skip
    # not measured (and it would write a full UNet to disk); train() writes its summary into final/
    checkpoint.save_final = lambda accelerator, unet, cfg, comps, final, step, **kw: final.mkdir(parents=True)
    checkpoint.save_checkpoint = lambda *a, **k: None
    recipe.train(cfg)
    peak = status_kib("VmHWM")
    print(json.dumps({"mode": args.child, "loaded_kib": marks["loaded"], "peak_kib": peak, **marks}))


def run_child(mode: str, args: argparse.Namespace, pipe: Path, pairs: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--pipe", str(pipe), "--pairs", str(pairs)]
    cmd += ["--out", str(out), "--resolution", str(args.resolution), "--steps", str(args.steps)]
    cmd += ["--lora", str(args.lora)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128, help="image side in px (latents: / 8)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (the second reuses AdamW's state)")
    ap.add_argument("--lora", type=int, default=4, help="LoRA rank")
    ap.add_argument("--budget-gib", type=float, default=12.0, help="largest full fine-tune peak to attempt")
    ap.add_argument("--widths", default="", help="block_out_channels, e.g. 320,640,1280,1280 (default: auto)")
    ap.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--pipe", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from cache_speedup import build_sd15_shaped, make_pairs

    if args.widths:
        widths = tuple(int(c) for c in args.widths.split(","))
    else:  # parameters scale with the square of the width
        fits = [
            w
            for w in WIDTHS
            if SD15_UNET_PARAMS * (w[0] / 320) ** 2 * BYTES_PER_PARAM_FULL < args.budget_gib * 2**30
        ]
        widths = fits[0] if fits else WIDTHS[-1]
    with tempfile.TemporaryDirectory(prefix="xdpo-mem-") as name:
        tmp = Path(name)
        pipe = build_sd15_shaped(tmp / "sd15", unet={"block_out_channels": list(widths)})
        pairs = make_pairs(tmp / "pairs.parquet", 4, args.resolution)
        rows = {mode: run_child(mode, args, pipe, pairs, tmp / mode) for mode in ("lora", "full")}
    print(
        f"\nSD1.5-shaped UNet, block_out_channels {widths}, {args.resolution} px (latents "
        f"{args.resolution // 8}x{args.resolution // 8}), batch 1 pair, {args.steps} steps, fp32, AdamW, 1 thread"
    )
    loop_gib = {}
    for mode, r in rows.items():
        loop_gib[mode] = (r["peak_kib"] - r["loaded_kib"]) / 2**20
        print(
            f"{mode:<5} {r['trained']:>13,} trained params: after loading {r['loaded_kib'] / 2**20:6.2f} GiB, "
            f"peak {r['peak_kib'] / 2**20:6.2f} GiB, training loop {loop_gib[mode]:6.2f} GiB"
        )
    ratio = loop_gib["lora"] / loop_gib["full"]
    print(f"loop memory LoRA / full: {ratio:.3f} (target <= 0.60: {'PASS' if ratio <= 0.6 else 'MISS'})")


if __name__ == "__main__":
    main()
