"""`xdpo pairs` and `xdpo relabel`: preference pairs from reward models (see the package docstring)."""

from __future__ import annotations

import argparse

SCORER_HELP = (
    "reward: a scorer name (pickscore, hpsv2, imagereward, clip, aesthetic, digits-reward, ...), a weighted "
    "sum such as pickscore:1,aesthetic:0.5, or a plugin module:function (f(images, prompts) -> scores) "
    "importable from the current directory or PYTHONPATH"
)


def _options(args: argparse.Namespace) -> dict:
    from xdpo.evaluate.scorers import parse_weights

    return parse_weights(args.weights)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pairs",
        help="sample K images per prompt, score them with a reward model, write preference pairs",
        description=(
            "On-policy preference pairs labelled by a reward model (Diffusion-DPO's AI feedback): K images per "
            "prompt at recorded seeds (seed + prompt_index * K + k), scored, paired best-vs-worst (or every "
            "pair whose score gap exceeds --min-gap), written in the Pick-a-Pic v2 schema plus score_0, "
            "score_1, seed_0, seed_1. Resumes after a kill (rerun the same command)."
        ),
        epilog="Example: xdpo pairs --model digits --prompts digits --per-prompt 4 --scorer digits-reward --out p.parquet",
    )
    p.add_argument(
        "--model", required=True, help="pipeline folder, hub id or a named model (digits, digits-flow)"
    )
    p.add_argument("--lora", help="LoRA weights to apply (a file, its folder, or a run's final/)")
    p.add_argument(
        "--prompts", required=True, help="a prompt set (digits, parti, hpsv2, ...) or a prompts file"
    )
    p.add_argument("--per-prompt", type=int, required=True, help="images sampled per prompt (K >= 2)")
    p.add_argument("--scorer", required=True, help=SCORER_HELP)
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH", help="a scorer's weights")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument(
        "--min-gap", type=float, help="keep every pair whose score gap exceeds G (default: best vs worst)"
    )
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--steps", type=int, help="inference steps (default: the model's sampling defaults)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--scheduler", help="sampling scheduler (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--out", required=True, help="output parquet file")
    p.set_defaults(func=run_pairs)

    r = sub.add_parser(
        "relabel",
        help="replace a preference table's labels with a reward model's (AI feedback)",
        description="Score both images of every row; label_0 = 1 / 0 / 0.5 by the scores; keeps label_0_original.",
    )
    r.add_argument(
        "--data", required=True, help="a preference table (parquet file/folder, save_to_disk, hub id)"
    )
    r.add_argument("--split", default="train", help="split of a DatasetDict folder or hub dataset")
    r.add_argument("--scorer", required=True, help=SCORER_HELP)
    r.add_argument("--weights", action="append", default=[], metavar="NAME=PATH", help="a scorer's weights")
    r.add_argument("--device", help="torch device for the scorers")
    r.add_argument("--out", required=True, help="output parquet file")
    r.set_defaults(func=run_relabel)


def run_pairs(args: argparse.Namespace) -> int:
    from xdpo.pairs.generate import make_pairs
    from xdpo.rollout.rewards import load_reward

    reward = load_reward(args.scorer, device=args.device, options=_options(args))
    summary = make_pairs(
        args.model, args.prompts, out=args.out, per_prompt=args.per_prompt, reward=reward,
        reward_spec=args.scorer, lora=args.lora, seed=args.seed, min_gap=args.min_gap, steps=args.steps,
        guidance=args.guidance, scheduler=args.scheduler, batch_size=args.batch_size, device=args.device,
        limit=args.limit,
    )  # fmt: skip
    print(
        f"wrote {summary['pairs']} pairs from {summary['n_prompts']} prompts to {args.out} ({reward.details})"
    )
    return 0


def run_relabel(args: argparse.Namespace) -> int:
    from xdpo.pairs.relabel import relabel
    from xdpo.rollout.rewards import load_reward

    reward = load_reward(args.scorer, device=args.device, options=_options(args))
    s = relabel(args.data, out=args.out, reward=reward, reward_spec=args.scorer, split=args.split)
    print(
        f"relabelled {s['rows']} rows into {args.out}: {s['labels_changed']} labels changed, {s['ties']} ties"
    )
    return 0
