"""How the digits configs' beta and learning rate were chosen: a small grid, scored by the hidden reward.

For each (config, beta, lr) it trains on the same pairs for the config's steps and prints the mean
hidden reward and prompt alignment of same-seed samples of the held-out prompts, plus the median
|delta| and the largest |n * delta| seen in training (where the xDPO transform departs from DPO's).

    python benchmarks/digits_sweep.py --pairs outputs/digits-demo/pairs.parquet \
        --configs digits-dpo.yaml,digits-xdpo.yaml --betas 500,2000,8000 --lrs 2e-5,1e-4
    python benchmarks/digits_sweep.py --model digits-flow --pairs outputs/digits-flow-demo/pairs.parquet \
        --configs digits-flow-dpo.yaml --betas 300 --lrs 3e-5        # the flow base (SD3 transformer)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--configs", default="digits-dpo.yaml,digits-xdpo.yaml")
    ap.add_argument("--betas", default="500,2000,8000")
    ap.add_argument("--lrs", default="2e-5,1e-4")
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--seeds", type=int, default=3, help="evaluation seeds per held-out prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more overrides, space-separated KEY=VALUE")
    ap.add_argument("--model", default="digits", help="base pipeline (default: the shipped digits base)")
    args = ap.parse_args()

    import torch

    from xdpo.apps.demo.run import CONFIGS, SameSeedEvaluator
    from xdpo.config import load_config
    from xdpo.models.denoiser import load_denoiser
    from xdpo.train.recipe import train

    torch.set_num_threads(args.threads)
    ev = SameSeedEvaluator(args.seeds, None if args.model == "digits" else args.model)
    base_reward, base_align = ev.score()
    print(f"base: reward {base_reward:.4f} alignment {base_align:.3f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            for beta in args.betas.split(","):
                for lr in args.lrs.split(","):
                    over = [f"data.path={args.pairs}", f"loss.beta={beta}", f"train.learning_rate={lr}"]
                    over += [f"model.pretrained={args.model}"]
                    over += [f"output_dir={tmp}/{config}-{beta}-{lr}", "train.checkpoint_every=0"]
                    over += args.extra.split() + ([f"train.max_steps={args.steps}"] if args.steps else [])
                    cfg = load_config(CONFIGS / config, over)
                    t0 = time.time()
                    out = train(cfg)
                    reward, align = ev.score(load_denoiser(out / "final"))  # unet/ or transformer/
                    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                    dmax = max(m["delta_abs_max"] for m in metrics)
                    dmed = float(np.median([abs(m["delta_w"]) + abs(m["delta_l"]) for m in metrics]) / 2)
                    acc = float(np.mean([m["implicit_acc"] for m in metrics[-50:]]))
                    row = (config, beta, lr, reward, align, acc, dmed, dmax * cfg.loss.n, time.time() - t0)
                    rows.append(row)
                    print(
                        f"{config:>22} beta={beta:>6} lr={lr:>6}: reward {reward:.4f} (base {base_reward:.4f}) "
                        f"alignment {align:.3f} train-acc {acc:.2f} |delta| ~{dmed:.2e} max n|delta| {row[7]:.2f} "
                        f"({row[8]:.0f} s)",
                        flush=True,
                    )
    best = max(rows, key=lambda r: r[3])
    print(f"best: {best[0]} beta={best[1]} lr={best[2]} reward {best[3]:.4f} (base {base_reward:.4f})")


if __name__ == "__main__":
    main()
