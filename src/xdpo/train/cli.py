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
  accelerate launch -m xdpo train --config configs/sd15-pickapic-xdpo.yaml      (multi-GPU)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a diffusion model on preference pairs",
        description=(
            "Fine-tune a Stable Diffusion 1.x/2.x UNet (full or LoRA) on preference pairs in the Pick-a-Pic v2 "
            "format with Diffusion-DPO, xDPO or another objective. Writes config.yaml, metrics.jsonl, "
            "checkpoints/step-N/ and final/ under output_dir."
        ),
        epilog=EPILOG.format(table=help_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (keys below)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. loss.beta=1000")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from xdpo.train.loop import train

    train(cfg)
    return 0
