"""`xdpo train`: parse the config, validate it, run the recipe."""

from __future__ import annotations

import argparse

from xdpo.config import help_table, load_config

EPILOG = """\
Configuration keys (set in the YAML file or as KEY=VALUE overrides):
{table}

Examples:
  xdpo train --config configs/sd15-pickapic-xdpo.yaml
  xdpo train --config configs/sd15-pickapic-dpo.yaml loss.beta=2500 train.max_steps=10 output_dir=runs/try
  xdpo train --config configs/sd15-pickapic-xdpo.yaml train.resume_from=latest
  xdpo train --config configs/sdxl-pickapic-dpo.yaml data.path=/data/pickapic --dry-run   (check, write nothing)
  accelerate launch -m xdpo train --config configs/sd15-pickapic-xdpo.yaml      (multi-GPU)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a diffusion model on preference pairs",
        description=(
            "Fine-tune an SD 1.x/2.x, SDXL, SD3/SD3.5, Flux.1, Qwen-Image, FLUX.2 [dev], FLUX.2 [klein], Z-Image or "
            "Wan 2.x model (full or LoRA) on preference pairs (Pick-a-Pic v2 format, webdataset, column-mapped "
            "sets, per-image labels) or on-policy rollouts with Diffusion-DPO / Flow-DPO, xDPO or another "
            "objective (`loss.objective`). Writes "
            "config.yaml, metrics.jsonl, checkpoints/step-N/ and final/ under output_dir. SIGINT/SIGTERM "
            "save a checkpoint and stop; resume with train.resume_from=latest."
        ),
        epilog=EPILOG.format(table=help_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (keys below)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, data and model; print the resolved config, usable pairs and a memory "
        "estimate; list every problem a real run would stop on (exit status 2 if any); write nothing",
    )
    p.add_argument(
        "--decode-images",
        action="store_true",
        help="with --dry-run: also decode every image (a progress bar; lists the rows whose images fail)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. loss.beta=1000")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        from xdpo.train.dryrun import dry_run, load_leniently

        cfg, problems = load_leniently(args.config, args.overrides)
        return dry_run(cfg, problems, decode_images=args.decode_images)
    cfg = load_config(args.config, args.overrides)
    from xdpo.train.recipe import train

    train(cfg)
    return 0
