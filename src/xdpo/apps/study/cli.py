"""`xdpo study`: the multi-seed comparison in both digits worlds (resumable: rerun the same command)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="a multi-seed, multi-pair-set study in both digits worlds: bracketed sweeps, intervals, ablations",
        description=(
            "The second edition (default): Diffusion-DPO (Flow-DPO on the flow base) against xDPO in the digits "
            "worlds (the UNet base `digits` and its rectified-flow twin `digits-flow`), on two tasks each: "
            "`slant` (a preference labelled with noise, ~72%% agreement with the true order, first) and `bold` "
            "(the first edition's). Per world and task: 3 pair sets; a sweep of 4 betas x 3 learning rates at "
            "one seed, a second seed at each method's 3 best points, selection on 200 images, the grid grown "
            "while a winner sits on its edge; both methods at their winners and Diffusion-DPO at xDPO's "
            "effective beta, 5 seeds x 3 pair sets each; on the noisy task xDPO's Table 3 ablation, its Eq. 10 "
            "and the summed error at matched beta, and Kang et al.'s stable reference update with and without "
            "the normalised timestep weight. The report (report.md in --out) gives every verdict from a "
            "hierarchical bootstrap over pair sets, seeds and images, steps-to-reach as a share of resamples, "
            "the reward-versus-drift frontier and the per-class view. Every stage resumes from what --out "
            "holds; `--plan` prints the time estimate (about 5 hours on 2 cores). `--edition 1` reruns the "
            "first edition (docs/results/study)."
        ),
    )
    p.add_argument(
        "--out", default=None,
        help="output folder (default: outputs/digits-study-2; --edition 1: outputs/digits-study)",
    )  # fmt: skip
    p.add_argument(
        "--worlds", default=None, help="sd (UNet base), flow (digits-flow) or both (default; --quick: sd)"
    )
    p.add_argument(
        "--tasks", default=None, help="second edition: slant, bold or both (default; --quick: slant)"
    )
    p.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default 2)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every stage (tiny grids, 16 steps; ~5 min on 2 cores)",
    )
    p.add_argument("--plan", action="store_true", help="print the plan and time estimate, run nothing")
    p.add_argument(
        "--report",
        action="store_true",
        help="rewrite report.md from the runs finished so far (trains nothing)",
    )
    p.add_argument("--edition", type=int, choices=(1, 2), default=2, help="2 (default) or the first edition")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.out = args.out or ("outputs/digits-study" if args.edition == 1 else "outputs/digits-study-2")
    if args.edition == 1:
        from xdpo.apps.study.run import run_study

        worlds = args.worlds or "sd,flow"
        run_study(args.out, quick=args.quick, worlds=worlds, workers=args.workers, plan_only=args.plan)
        return 0
    from xdpo.apps.study.run2 import run_study2

    run_study2(
        args.out, quick=args.quick, worlds=args.worlds, tasks=args.tasks, workers=args.workers,
        plan_only=args.plan, report_only=args.report,
    )  # fmt: skip
    return 0
