"""`xdpo demo`: run the digits demo (resumable: rerun the same command to continue)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the digits world end to end: pairs, Diffusion-DPO vs xDPO, evaluation, report",
        description=(
            "Run the digits demo on the CPU: sample preference pairs from the shipped digits base and label them "
            "with the hidden labeller, train Diffusion-DPO, xDPO (both forms) and SFT with the shipped digits "
            "configs, evaluate checkpoints and final models at the same seeds, and write report.md with a table, "
            "reward-vs-step curves and image grids. Each stage reuses what an earlier run left in --out, so an "
            "interrupted demo continues where it stopped. --family flow runs the same on the flow-matching "
            "twin digits-flow (an SD3 pipeline): Flow-DPO, xDPO (both forms) and SFT."
        ),
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: outputs/digits-demo; --family flow: outputs/digits-flow-demo; "
        "--ablation: outputs/digits-ablation; --online: outputs/digits-online)",
    )
    p.add_argument(
        "--family",
        choices=("sd", "flow"),
        default="sd",
        help="sd: the UNet base `digits`, Diffusion-DPO (default); flow: `digits-flow` (SD3 transformer, "
        "rectified flow), Flow-DPO",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run: fewer pairs, steps and samples (its time on 2 CPU cores: docs/results.md, "
        '"What the demo measured")',
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="the Kang et al. ablation instead: + reference update, + timestep-aware, both, xDPO + both, KTO, SFT",
    )
    p.add_argument(
        "--online",
        action="store_true",
        help="on-policy rounds (online.enabled) against one offline round at equal optimizer steps, same scorer "
        "and seeds (default out: outputs/digits-online; --family flow: outputs/digits-flow-online)",
    )
    p.add_argument(
        "--online-rl",
        action="store_true",
        help="offline Diffusion-DPO, online DPO, DiffusionNFT, AWM and DGPO at equal images sampled, trained on a "
        "noisy labeller, evaluated on the hidden reward (default out: outputs/digits-online-rl, "
        "--family flow: outputs/digits-flow-online-rl)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="--online-rl: training seeds per arm (default 3, --quick 1); intervals are over these seeds",
    )
    p.add_argument(
        "--arms",
        default="",
        help="--online-rl: comma-separated slugs of the arms to run (default all: offline, online-dpo, nft, awm, "
        "dgpo, dgpo-emaref, grpo, grpo-window, dpok, d3po, dgpo-stable, d3po-stable)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from xdpo.apps.demo.run import DEFAULT_OUT, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "online_rl", False):
        from xdpo.apps.demo.online_rl import DEFAULT_OUT as RL_OUT
        from xdpo.apps.demo.online_rl import run_online_rl
        from xdpo.errors import ConfigError

        if args.ablation or args.online:
            raise ConfigError("--online-rl is its own demo: not with --online or --ablation")
        out = args.out or RL_OUT[args.family]
        arms = tuple(a for a in args.arms.split(",") if a)
        run_online_rl(out, quick=args.quick, family=args.family, seeds=args.seeds, arms=arms)
        return 0
    if args.seeds is not None or args.arms:
        from xdpo.errors import ConfigError

        raise ConfigError("--seeds and --arms apply to --online-rl only")
    if getattr(args, "online", False):
        from xdpo.apps.demo.online import DEFAULT_OUT as ONLINE_OUT
        from xdpo.apps.demo.online import run_online
        from xdpo.errors import ConfigError

        if args.ablation:
            raise ConfigError("--online and --ablation are two different demos: choose one")
        run_online(args.out or ONLINE_OUT[args.family], quick=args.quick, family=args.family)
        return 0
    out = args.out or ("outputs/digits-ablation" if args.ablation else DEFAULT_OUT[args.family])
    run_demo(out, quick=args.quick, ablation=args.ablation, family=args.family)
    return 0
