"""Training-step overhead: one full `xdpo train` step over the bare model compute it cannot avoid.

Bare compute = policy forward + backward on [w; l] + reference forward (inference mode) + AdamW step,
on tensors already in memory (any family: `--model` is a pipeline folder or a named model). The loop adds data decoding and transforms, the VAE encode,
the text encoder, the loss, metrics and logging. Prints the ratio (docs/design.md §6: peers measured ~1.38x).

    python benchmarks/step_overhead.py [--model digits] [--batch 8] [--steps 30] [--lora 4] [--cache]

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


def overrides(model: str, pairs: Path, out: Path, batch: int, steps: int, lora: int, cache: str) -> list[str]:
    return [
        f"model.pretrained={model}", f"data.path={pairs}", "data.resolution=32", f"output_dir={out}",
        f"train.max_steps={steps + 3}", f"train.batch_size={batch}", "train.checkpoint_every=0",
        "train.learning_rate=1e-6", "train.scale_lr=false", "train.warmup_steps=0", f"model.lora_rank={lora}",
        f"data.cache={cache}",
    ]  # fmt: skip


def bare_step_time(cfg, batch: int, steps: int) -> float:
    """Policy forward + backward on [w; l], reference forward (no grad), optimizer step: tensors in memory."""
    from xdpo.train.setup import load_models

    comps, process, model, ref, params = load_models(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    fam = comps.family
    g = torch.Generator().manual_seed(0)
    pairs = load_pairs_batch(cfg, batch)
    from xdpo.train.step import encode_batch

    latents, cond = encode_batch(comps, pairs, g)
    k = torch.randint(0, process.num_steps, (2 * batch,), generator=g)
    noisy, target = process.noise(latents, torch.randn(latents.shape, generator=g), k)
    t = process.model_timestep(k)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref.predict(noisy, t, cond)
        (fam.predict(model, noisy, t, cond) - target).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def load_pairs_batch(cfg, batch: int) -> dict:
    from xdpo.data import collate_pairs, open_data

    plain = cfg.data.cache
    cfg.data.cache = ""
    _, pairs, _ = open_data(cfg)
    cfg.data.cache = plain
    return collate_pairs([pairs[(i, 0)] for i in range(batch)])


def loop_step_time(cfg) -> float:
    from xdpo.train.loop import train

    out = train(cfg)
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
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    ap.add_argument("--cache", action="store_true", help="train from a latent cache (xdpo cache) too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from xdpo.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(args.pairs) if args.pairs else Path(tmp) / "pairs.parquet"
        if not args.pairs:
            from xdpo.digits.pairs import make_pairs

            make_pairs(pairs, 64, seed=0, progress=False)
        cfg = load_config(
            None, overrides(args.model, pairs, Path(tmp) / "run", args.batch, args.steps, args.lora, "")
        )
        bare = bare_step_time(cfg, args.batch, args.steps)
        full = loop_step_time(cfg)
        cached = None
        if args.cache:
            from xdpo.train.cache_cli import build_cache

            cache = Path(tmp) / "cache"
            ccfg = load_config(
                None,
                overrides(
                    args.model, pairs, Path(tmp) / "cached", args.batch, args.steps, args.lora, str(cache)
                ),
            )
            build_cache(ccfg)
            cached = loop_step_time(ccfg)
    print(f"model={args.model} batch={args.batch} pairs lora={args.lora} threads={args.threads}")
    print(f"bare compute (policy fwd+bwd, reference fwd, AdamW): {bare * 1000:.1f} ms/step (median)")
    print(f"xdpo train step:                                    {full * 1000:.1f} ms/step (median)")
    print(f"overhead ratio: {full / bare:.2f}x (target <= 1.10)")
    if cached is not None:
        print(f"xdpo train step from the latent cache:              {cached * 1000:.1f} ms/step (median)")
        print(f"overhead ratio with the cache: {cached / bare:.2f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
