"""`xdpo sample` and `xdpo evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from xdpo.evaluate.prompts import PROMPT_SETS
from xdpo.evaluate.sample import MODELS, SCHEDULERS
from xdpo.evaluate.scorers import SCORERS


class _Formatter(argparse.HelpFormatter):
    """Show a default only where there is one and the help does not already describe it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sample` and `evaluate` commands."""
    from xdpo.digits import DIGITS_SAMPLING as DIGITS  # a dict, no torch import

    p = subparsers.add_parser(
        "sample",
        help="sample images for prompts x seeds (images + manifest.jsonl)",
        formatter_class=_Formatter,
        description=(
            "Sample every prompt with every seed. Each (prompt, seed) image has its own generator, so "
            "the same (prompt, seed) starts from the same noise in any model, batch size or device: "
            "compare models at equal seeds with `xdpo evaluate --baseline`. "
            "Writes OUT/images/NNNNN.png and OUT/manifest.jsonl (prompt, seed, file, model, lora, "
            "steps, guidance, scheduler, height, width)."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"diffusers pipeline folder, or a named model ({', '.join(MODELS)})",
    )
    p.add_argument(
        "--lora", help="LoRA folder (pytorch_lora_weights.safetensors, or a run folder with final/)"
    )
    p.add_argument(
        "--prompts",
        required=True,
        help=(
            "prompts file (.txt one per line; .tsv/.csv/.json/.jsonl/.parquet with a 'prompt' or "
            f"'caption' column) or a named set ({', '.join(sorted(PROMPT_SETS))})"
        ),
    )
    p.add_argument("--seeds", default="0", help="seeds: '0,1,2', '0-4' (inclusive) or a count 'n:5'")
    p.add_argument(
        "--steps",
        type=_positive_int,
        help=f"denoising steps (default: 50 as in the SD papers; --model digits: {DIGITS['steps']})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help=f"classifier-free guidance (default: 7.5 as in the SD papers; --model digits: {DIGITS['guidance']})",
    )
    p.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        help=f"sampler (default: ddim; --model digits: {DIGITS['scheduler']})",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per pipeline call")
    p.add_argument("--height", type=int, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width (default: the model's native size)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], help="weights dtype (default: fp16 on cuda, fp32 on cpu)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=run_sample)

    e = subparsers.add_parser(
        "evaluate",
        help="score a sample folder; summary, bootstrap intervals, same-seed win rates",
        formatter_class=_Formatter,
        description=(
            "Score the images of a folder written by `xdpo sample`; write per-image scores, "
            "summary.json and summary.md (mean, median, 95% bootstrap interval; with --baseline the "
            "win rate against the baseline at the same (prompt, seed), ties counting 0.5). "
            "Scores are cached in each sample folder (scores.parquet) and reused."
        ),
    )
    e.add_argument("--images", required=True, type=Path, help="a sample folder (with manifest.jsonl)")
    e.add_argument(
        "--scorers", required=True, help=f"comma-separated scorer names (available: {', '.join(SCORERS)})"
    )
    e.add_argument("--baseline", type=Path, help="a sample folder to compare with, matched by (prompt, seed)")
    e.add_argument("--out", type=Path, help="output folder (default: the --images folder)")
    e.add_argument(
        "--format", dest="fmt", choices=["parquet", "csv"], default="parquet", help="scores file format"
    )
    e.add_argument("--batch-size", type=_positive_int, help="images per scorer call (default: the scorer's)")
    e.add_argument("--bootstrap", type=_positive_int, default=2000, help="bootstrap resamples")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--rescore", action="store_true", help="ignore cached scores")
    e.add_argument("--device", help="torch device for model-based scorers")
    e.set_defaults(func=run_evaluate)


def run_sample(args: argparse.Namespace) -> int:
    from xdpo.evaluate.prompts import resolve_prompts
    from xdpo.evaluate.sample import sample_images

    prompts = resolve_prompts(args.prompts)[: args.limit]
    defaults = {"steps": 50, "guidance": 7.5, "scheduler": "ddim"}  # SD papers
    if args.model == "digits" and not Path(args.model).exists():  # the digits world's own settings
        from xdpo.digits import DIGITS_SAMPLING

        defaults |= DIGITS_SAMPLING
    out = sample_images(
        args.model,
        prompts,
        args.seeds,
        out_dir=args.out,
        lora=args.lora,
        steps=args.steps or defaults["steps"],
        guidance=args.guidance if args.guidance is not None else defaults["guidance"],
        scheduler=args.scheduler or defaults["scheduler"],
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
    )
    n = sum(1 for _ in (out / "manifest.jsonl").open())
    print(f"wrote {n} images and {out / 'manifest.jsonl'}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from xdpo.evaluate.evaluate import evaluate_folder, summary_markdown

    summary = evaluate_folder(
        args.images,
        args.scorers,
        baseline=args.baseline,
        out=args.out,
        fmt=args.fmt,
        batch_size=args.batch_size,
        n_resamples=args.bootstrap,
        seed=args.seed,
        reuse=not args.rescore,
        device=args.device,
    )
    print(summary_markdown(summary))
    print("wrote " + ", ".join(summary["files"].values()))
    return 0
