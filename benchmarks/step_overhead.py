"""Training-step overhead: one full `xdpo train` step over the bare model compute it cannot avoid.

Bare compute = policy UNet forward + backward on [w; l] + reference UNet forward (inference mode) +
AdamW step, on tensors already in memory. The loop adds data decoding and transforms, the VAE encode,
the text encoder, the loss, metrics and logging. Prints the ratio (docs/design.md §6: peers measured ~1.38x).

    python benchmarks/step_overhead.py [--model digits] [--batch 8] [--steps 30] [--threads 1]

Run it alone on the machine (docs/design.md §7: a second busy process distorts CPU timings badly).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def bare_step_time(model: str, batch: int, steps: int) -> float:
    from xdpo.config import load_config
    from xdpo.models.load import load_components
    from xdpo.train.reference import Reference

    cfg = load_config(None, [f"model.pretrained={model}", "data.path=x"])
    comps = load_components(cfg.model)
    unet = comps.unet.train()
    ref = Reference(cfg.reference, unet, lora=False, dtype=torch.float32, device=torch.device("cpu"))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, foreach=True)
    c = unet.config
    x = torch.randn(2 * batch, c.in_channels, c.sample_size, c.sample_size)
    t = torch.randint(0, 1000, (2 * batch,))
    cond = torch.randn(2 * batch, 77, c.cross_attention_dim)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref.forward(unet, x, t, cond)
        unet(x, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def loop_step_time(model: str, pairs: Path, batch: int, steps: int, out: Path) -> float:
    from xdpo.config import load_config
    from xdpo.train.loop import train

    cfg = load_config(
        None,
        [
            f"model.pretrained={model}",
            f"data.path={pairs}",
            "data.resolution=32",
            f"output_dir={out}",
            f"train.max_steps={steps + 3}",
            f"train.batch_size={batch}",
            "train.checkpoint_every=0",
            "train.learning_rate=1e-6",
            "train.scale_lr=false",
            "train.warmup_steps=0",
        ],
    )
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][3:]
    times = sorted(r["step_time"] for r in rows)
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--pairs", default=None, help="a pairs parquet (default: make 64 digits pairs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(args.pairs) if args.pairs else Path(tmp) / "pairs.parquet"
        if not args.pairs:
            from xdpo.digits.pairs import make_pairs

            make_pairs(pairs, 64, seed=0, progress=False)
        bare = bare_step_time(args.model, args.batch, args.steps)
        full = loop_step_time(args.model, pairs, args.batch, args.steps, Path(tmp) / "run")
    print(f"model={args.model} batch={args.batch} pairs threads={args.threads}")
    print(f"bare compute (policy fwd+bwd, reference fwd, AdamW): {bare * 1000:.1f} ms/step (median)")
    print(f"xdpo train step:                                    {full * 1000:.1f} ms/step (median)")
    print(f"overhead ratio: {full / bare:.2f}x")


if __name__ == "__main__":
    main()
