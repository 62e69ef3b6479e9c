"""`xdpo digits base | build-base | make-pairs`: the embedded digits world from the command line."""

from __future__ import annotations

import json
import os

from xdpo.apps.digits import DIGITS_SAMPLING, base_model_path
from xdpo.errors import ConfigError


def register(subparsers) -> None:
    """Add the `digits` command and its sub-commands to the main parser's subparsers."""
    p = subparsers.add_parser(
        "digits",
        help="the built-in digits world: shipped base model, rebuild recipe, labelled preference pairs",
        description=(
            "A Stable Diffusion in miniature on scikit-learn's handwritten digits (32x32), with a hidden "
            "labeller that stands in for human taste. See docs/design.md §5."
        ),
    )
    sub = p.add_subparsers(dest="digits_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    b = sub.add_parser(
        "base",
        help="print the path of the shipped base pipeline",
        description="Print the path of the shipped digits base `StableDiffusionPipeline` folder.",
    )
    b.set_defaults(func=_base)

    bb = sub.add_parser(
        "build-base",
        help="rebuild the base pipeline from scratch (~30 min on one busy CPU core)",
        description=(
            "Train the digits base from scratch with the shipped recipe: AutoencoderKL (32x32 -> 4x8x8), "
            "then CLIPTextModel + UNet2DConditionModel jointly with EMA, then save_pretrained. "
            "Took 29 min on one core of a busy 2-core machine (--quick: a few seconds, a smoke build of no quality). "
            "--family flow builds the flow-matching twin instead (StableDiffusion3Pipeline, digits-base's autoencoder)."
        ),
    )
    bb.add_argument(
        "--family",
        choices=("sd", "flow"),
        default="sd",
        help="sd: the DDPM UNet base, a StableDiffusionPipeline folder (default); flow: its rectified-flow "
        "twin digits-flow, a StableDiffusion3Pipeline folder (SD3Transformer2DModel, two CLIP encoders, no T5)",
    )
    bb.add_argument("--out", required=True, help="output folder (a diffusers pipeline folder)")
    bb.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    bb.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; more than the free cores slows it down (default: %(default)s)",
    )
    bb.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke build (tests the code path only)"
    )
    bb.add_argument(
        "--no-eval", action="store_true", help="skip the prompted-digit accuracy check after building"
    )
    bb.set_defaults(func=_build_base)

    mp = sub.add_parser(
        "make-pairs",
        help="sample labelled preference pairs from a digits model (Pick-a-Pic v2 parquet)",
        description=(
            "Sample two images per caption from a digits model (the UNet base or digits-flow), score them with the hidden reward and "
            "label them by Bradley-Terry with ties and noise. Writes the Pick-a-Pic v2 schema (caption, "
            "jpg_0, jpg_1, label_0, label_1) plus reward_0, reward_1, digit, and OUT.json with settings and counts."
        ),
    )
    from xdpo.apps.digits.tasks import TASKS

    mp.add_argument("--out", required=True, help="output parquet file")
    mp.add_argument(
        "--task",
        choices=tuple(TASKS),
        default="bold",
        help="the preference: bold (legible and bold, the demos' task) or slant (legible and leaning right, "
        "labelled with more noise; docs/digits.md) (default: %(default)s)",
    )
    mp.add_argument("--n", type=int, required=True, help="number of pairs")
    mp.add_argument(
        "--seed", type=int, default=0, help="seed for captions, noise and labels (default: %(default)s)"
    )
    mp.add_argument(
        "--model",
        default=None,
        help="digits (the shipped UNet base, default), digits-flow (its flow-matching twin) or a pipeline folder",
    )
    mp.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Bradley-Terry temperature: P(0 preferred) = sigmoid((R0-R1)/T) (default: the task's; bold 0.5, "
        "slant 0.5)",
    )
    mp.add_argument(
        "--noise",
        type=float,
        default=None,
        help="probability of flipping a non-tie label (default: the task's; bold 0.05, slant 0.1)",
    )
    mp.add_argument(
        "--tie-margin",
        type=float,
        default=None,
        help="|R0-R1| below which a tie may be recorded (default 0.1)",
    )
    mp.add_argument(
        "--tie-prob",
        type=float,
        default=None,
        help="probability of a tie when |R0-R1| < tie margin (default 1)",
    )
    flow = "digits-flow: 25 FlowMatchEuler steps, guidance 3.0"
    mp.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (default: the model's own; digits: {DIGITS_SAMPLING['steps']} DDIM; {flow})",
    )
    mp.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (default: the model's own; digits: {DIGITS_SAMPLING['guidance']})",
    )
    mp.add_argument(
        "--batch-size", type=int, default=128, help="images per pipeline call (default: %(default)s)"
    )
    mp.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); on a shared machine use 1: oversubscribed threads are many times slower",
    )
    mp.set_defaults(func=_make_pairs)


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise ConfigError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def _base(args) -> int:
    print(base_model_path())
    return 0


def _build_base(args) -> int:
    from xdpo.apps.digits.base import build_base, measure_accuracy

    _set_threads(args.threads)
    if os.path.exists(os.path.join(args.out, "model_index.json")):
        print(f"note: overwriting the pipeline in {args.out}")
    if args.family == "flow":
        return _build_flow_base(args)
    summary = build_base(args.out, seed=args.seed, threads=args.threads, quick=args.quick)
    if not args.no_eval:
        acc = measure_accuracy(args.out, n_per_digit=2 if args.quick else 20, seed=1234)
        summary["prompted_digit_accuracy"] = {"value": acc["accuracy"], "n": acc["n"], **DIGITS_SAMPLING}
        with open(os.path.join(args.out, "xdpo_digits.json"), "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        print(f"prompted-digit accuracy {acc['accuracy']:.3f} over {acc['n']} samples (canonical prompts)")
    print(args.out)
    return 0


def _build_flow_base(args) -> int:
    from xdpo.apps.digits.flow_base import build_flow_base, measure_flow_accuracy

    summary = build_flow_base(args.out, seed=args.seed, threads=args.threads, quick=args.quick)
    if not args.no_eval:
        acc = measure_flow_accuracy(args.out, n_per_digit=2 if args.quick else 20, seed=1234)
        summary["prompted_digit_accuracy"] = {
            "value": acc["accuracy"],
            "n": acc["n"],
            **summary["sampling"],
            "prompts": 'canonical ("a handwritten digit seven"), seed 1234',
        }
        with open(os.path.join(args.out, "xdpo_digits.json"), "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        print(f"prompted-digit accuracy {acc['accuracy']:.3f} over {acc['n']} samples (canonical prompts)")
    print(args.out)
    return 0


def _make_pairs(args) -> int:
    import dataclasses

    from xdpo.apps.digits.pairs import make_pairs, sidecar_path
    from xdpo.apps.digits.tasks import get_task

    _set_threads(args.threads)
    given = {k: getattr(args, k) for k in ("temperature", "noise", "tie_margin", "tie_prob")}
    settings = dataclasses.replace(
        get_task(args.task).labeller, **{k: v for k, v in given.items() if v is not None}
    )
    rec = make_pairs(
        args.out,
        args.n,
        args.seed,
        model=args.model,
        settings=settings,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        task=args.task,
    )
    c = rec["counts"]
    print(
        f"wrote {rec['n_pairs']} pairs to {rec['file']} in {rec['seconds']:.0f} s: {c['ties']} ties "
        f"({rec['tie_rate']:.1%}), {c['noise_flips']} noise flips, labels agree with the true reward on "
        f"{rec['agreement_with_true_reward']:.1%} of non-ties, prompted-digit accuracy {rec['prompt_accuracy']:.1%}"
    )
    print(f"settings and counts: {sidecar_path(rec['file'])}")
    return 0
