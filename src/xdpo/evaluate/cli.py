"""`xdpo sample`, `xdpo evaluate` and `xdpo compare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from xdpo.evaluate.pipeline import MODEL_SAMPLING, PAPER_SAMPLING, SCHEDULERS
from xdpo.evaluate.plugins import load_plugins
from xdpo.evaluate.prompts import PROMPT_SETS
from xdpo.evaluate.sample import LAYOUTS
from xdpo.evaluate.scorers import SCORER_ALIASES, SCORERS

WEIGHTS_HELP = (
    "NAME=PATH: local weights for a scorer instead of its hub default (repeatable); NAME.PART=PATH "
    "for its other parts: pickscore=DIR pickscore.processor=DIR, clip=DIR, aesthetic=FILE (.pth or "
    ".safetensors) aesthetic.clip=DIR, hpsv2.0=FILE / hpsv2.1=FILE (HPS_v2*_compressed.pt) "
    "hpsv2.0.tokenizer=DIR, imagereward=FILE imagereward.config=FILE (med_config.json). A DIR may "
    "also be a hub id."
)
BACKEND_HELP = (
    "how HPSv2 runs: open_clip (the official model code; pip install 'xdpo[hpsv2]', needs torchvision) "
    "or transformers (the same weights mapped onto a transformers CLIPModel, no extra)"
)


def _scorer_names() -> str:
    aliases = ", ".join(f"{a} = {b}" for a, b in SCORER_ALIASES.items())
    return f"{', '.join(SCORERS)}; {aliases}"


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scorers", required=True, help=f"comma-separated scorer names (available: {_scorer_names()})"
    )
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH", help=WEIGHTS_HELP)
    p.add_argument("--hpsv2-backend", choices=["open_clip", "transformers"], help=BACKEND_HELP)
    p.add_argument("--batch-size", type=_positive_int, help="images per scorer call (default: the scorer's)")
    p.add_argument("--bootstrap", type=_positive_int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--rescore", action="store_true", help="ignore cached scores")
    p.add_argument("--device", help="torch device for model-based scorers (default: cuda if available)")


def _scorer_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """--weights and --hpsv2-backend as load_scorers options."""
    from xdpo.evaluate.scorers import canonical_name, parse_weights

    options = parse_weights(args.weights)
    if args.hpsv2_backend:
        for name in (canonical_name(s.strip()) for s in args.scorers.split(",")):
            if name.startswith("hpsv2"):
                options.setdefault(name, {})["backend"] = args.hpsv2_backend
    return options


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
    """Add the `sample`, `evaluate` and `compare` commands."""
    load_plugins()  # scorers, prompt sets and named models for the help texts

    def named(key: str) -> str:  # "; --model digits: 25" for each named model with its own default
        return "".join(f"; --model {m}: {d[key]}" for m, d in MODEL_SAMPLING.items() if key in d)

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
        help=f"diffusers pipeline folder, or a named model as model.pretrained ({', '.join(MODEL_SAMPLING)})",
    )
    p.add_argument(
        "--lora", help="LoRA folder (pytorch_lora_weights.safetensors, or a run folder with final/)"
    )
    p.add_argument(
        "--vae", help="another VAE folder or hub id (e.g. SDXL's fp16-fix VAE) instead of the pipeline's"
    )
    p.add_argument(
        "--prompts",
        required=True,
        help=(
            "prompts file (.txt one per line; .tsv/.csv/.json/.jsonl/.parquet with a 'prompt' or "
            f"'caption' column), a named set ({', '.join(sorted(PROMPT_SETS))}), or a named set from a "
            "local copy: parti:PartiPrompts.tsv, hpsv2:FOLDER (anime.json ...), hpsv2:anime,photo, "
            "pickapic-test:FILE"
        ),
    )
    p.add_argument(
        "--seeds",
        help="seeds: '0,1,2', '0-4' (inclusive) or a count 'n:5' (default: 0; pickapic-test: 0-4 as Kang et al.)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        help=f"denoising steps (default: {PAPER_SAMPLING['steps']} as in the SD papers{named('steps')})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help=f"classifier-free guidance (default: {PAPER_SAMPLING['guidance']} as in the SD papers{named('guidance')})",
    )
    p.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        help=f"sampler (default: the family's own: {PAPER_SAMPLING['scheduler']} for SD 1.x/2.x as in the "
        f"papers, the pipeline's own scheduler for SDXL, SD3 and Flux{named('scheduler')})",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per pipeline call")
    p.add_argument("--height", type=int, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width (default: the model's native size)")
    p.add_argument(
        "--num-frames",
        type=_positive_int,
        help="video models: frames per video (default: the model's, Wan 81)",
    )
    p.add_argument("--fps", type=float, help="video models: frames per second of the mp4 (default: Wan's 16)")
    p.add_argument("--limit", type=_positive_int, help="use only the first N prompts (per style for hpsv2)")
    p.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        default="default",
        help="default: images/NNNNN.png; hpsv2: <style>/<index:05d>.jpg as the official HPSv2 "
        "evaluation reads (seed<S>/<style>/... with several seeds)",
    )
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
    _add_scoring_args(e)
    e.add_argument("--baseline", type=Path, help="a sample folder to compare with, matched by (prompt, seed)")
    e.add_argument("--out", type=Path, help="output folder (default: the --images folder)")
    e.add_argument(
        "--format", dest="fmt", choices=["parquet", "csv"], default="parquet", help="scores file format"
    )
    e.set_defaults(func=run_evaluate)

    c = subparsers.add_parser(
        "compare",
        help="tables of several models: mean scores (xDPO Table 2), win rates vs baselines (Kang et al. Table 1)",
        formatter_class=_Formatter,
        description=(
            "Score sample folders of several models and write, to --out: table2.md/.csv (mean score per "
            "model and prompt set, per scorer), winrates.md/.csv (win rate of each model against each "
            "baseline at the same (prompt, seed), per scorer, with their average), *_long.csv with "
            "bootstrap intervals (and HPSv2 per-style rows), bar plots table2.png and winrates.png, and "
            "compare.json. Give a model one folder per prompt set by repeating its name: "
            "`xdpo compare sd15=s/parti sd15=s/hps dpo=d/parti dpo=d/hps --baseline sd15 "
            "--scorers pickscore,hpsv2,aesthetic,clip,imagereward --out report`."
        ),
    )
    c.add_argument(
        "models", nargs="+", metavar="NAME=DIR", help="sample folders (a bare DIR is named after it)"
    )
    c.add_argument(
        "--baseline",
        action="append",
        dest="baselines",
        metavar="NAME",
        help="a model to compare the others against (repeatable; default: the first model)",
    )
    _add_scoring_args(c)
    c.add_argument("--out", required=True, type=Path, help="output folder")
    c.add_argument("--no-plots", action="store_true", help="skip the bar plots")
    c.set_defaults(func=run_compare)


def run_sample(args: argparse.Namespace) -> int:
    from xdpo.evaluate.pipeline import sampling_defaults
    from xdpo.evaluate.prompts import default_seeds, limit_records, resolve_prompt_records
    from xdpo.evaluate.sample import sample_images

    prompts = limit_records(resolve_prompt_records(args.prompts), args.limit)
    defaults = sampling_defaults(args.model)  # the SD papers', or a named model's own (digits)
    out = sample_images(
        args.model,
        prompts,
        args.seeds if args.seeds is not None else default_seeds(args.prompts),
        out_dir=args.out,
        lora=args.lora,
        vae=args.vae,
        steps=args.steps or defaults["steps"],
        guidance=args.guidance if args.guidance is not None else defaults["guidance"],
        scheduler=args.scheduler or defaults["scheduler"],
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
        layout=args.layout,
        prompt_set=str(args.prompts),
        num_frames=args.num_frames,
        fps=args.fps,
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
        options=_scorer_options(args),
    )
    print(summary_markdown(summary))
    print("wrote " + ", ".join(summary["files"].values()))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from xdpo.evaluate.tables import compare_folders, parse_models

    result = compare_folders(
        parse_models(args.models),
        args.scorers,
        out=args.out,
        baselines=args.baselines,
        options=_scorer_options(args),
        device=args.device,
        batch_size=args.batch_size,
        n_resamples=args.bootstrap,
        seed=args.seed,
        reuse=not args.rescore,
        plots=not args.no_plots,
    )
    for key in ("table2_md", "winrates_md"):
        if key in result["files"]:
            print(Path(result["files"][key]).read_text())
    print("wrote " + ", ".join(result["files"].values()))
    return 0
