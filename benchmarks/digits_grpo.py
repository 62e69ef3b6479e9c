"""GRPO with and without MixGRPO's window against DiffusionNFT in the digits world, at equal sampled images and
equal optimizer steps: the online-RL demo's harness (`xdpo demo --online-rl`: noisy labeller, hidden reward
at held-out prompts and seeds, compute seconds per arm) with these three arms.

    OMP_NUM_THREADS=1 nice python benchmarks/digits_grpo.py --out outputs/digits-grpo-bench [--quick] [--family sd]

Arms (each the demo's config of its world: model, lr, batch, steps): DiffusionNFT as in the demo (soft old
policy); GRPO at Flow-GRPO's defaults (every sampler step an SDE step, 9 of 10 trained, KL 0.04 to the frozen
base); GRPO with MixGRPO's window (4 SDE steps, moved one step every round). A smoke-scale measurement: one
training seed, hyperparameters not tuned per method.
"""

from __future__ import annotations

import argparse

from xdpo.apps.demo.online_rl import NOISY, OnlineRLSettings, run_online_rl
from xdpo.apps.demo.run import Method


def methods(s: OnlineRLSettings) -> tuple[Method, ...]:
    from xdpo.apps.demo.online_rl import CONFIG

    config, P, E = CONFIG[s.family], s.prompts_per_round, s.every
    common = ("data.path=", "online.enabled=true", f"online.prompts={s.prompts_file}",
              f"online.per_prompt={s.per_prompt}", f"online.scorer={NOISY}", "online.heldout_scorer=digits-reward",
              f"online.sample_steps={s.sample_steps}", "online.monitor_images=8", "online.batch_images=16",
              f"online.prompts_per_round={P}", f"online.every={E}")  # fmt: skip
    grpo = (*common, "loss.objective=grpo", "reference.strategy=frozen")
    return (
        Method("DiffusionNFT", "nft", config, (*common, "loss.objective=nft", "reference.strategy=soft",
                                               f"reference.update_every={E}", "reference.soft_max=0.5")),
        Method("GRPO (Flow-GRPO)", "grpo", config, grpo),
        Method("GRPO + MixGRPO window", "grpo-window", config, (*grpo, "grpo.window=4", "grpo.window_every=1")),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/digits-grpo-bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", default="sd", choices=("sd", "flow"))
    args = ap.parse_args()
    s = OnlineRLSettings.make_rl(args.out, quick=args.quick, family=args.family)
    s.methods = methods(s)
    run_online_rl(s.out, settings=s)


if __name__ == "__main__":
    main()
