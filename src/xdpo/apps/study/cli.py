"""`xdpo study`: the multi-seed comparison in both digits worlds (resumable: rerun the same command)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="a fair multi-seed study in both digits worlds: sweeps, 3 seeds, matched beta, Kang ablation",
        description=(
            "Compare Diffusion-DPO (Flow-DPO on the flow base), xDPO in both forms, SFT and Diffusion-KTO in "
            "the digits worlds (the UNet base `digits` and its rectified-flow twin `digits-flow`). Stages: "
            "pairs from each base labelled by the hidden labeller; a sweep of every method over the same "
            "(beta, lr) budget with one seed; each method at its best point with 3 training seeds, xDPO "
            "(Appendix C) also at Diffusion-DPO's initial effective beta (beta / 1.05), and Kang et al.'s "
            "ablation on the UNet base (+ reference update, + timestep-aware, both: with the configs' guard and "
            "with tau 16 / delta 0.5; tau 4 without the guard for twice the steps; KTO at its own sweep point); "
            "then "
            "report.md with reward-vs-step curves (95% intervals over seeds), steps to reach Diffusion-DPO's "
            "final reward, same-seed win rates, histograms of n*delta over training and plain answers. Every "
            "stage resumes from what --out holds. About 80 minutes on 2 cores (`--plan` prints the estimate)."
        ),
    )
    p.add_argument(
        "--out", default="outputs/digits-study", help="output folder (default: outputs/digits-study)"
    )
    p.add_argument("--worlds", default="sd,flow", help="sd (UNet base), flow (digits-flow) or both (default)")
    p.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run of every stage (tiny grids, few steps)")
    p.add_argument("--plan", action="store_true", help="print the plan and time estimate, run nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xdpo.apps.study.run import run_study

    run_study(args.out, quick=args.quick, worlds=args.worlds, workers=args.workers, plan_only=args.plan)
    return 0
