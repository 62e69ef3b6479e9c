"""The xDPO paper's efficiency claim in the digits world: steps to reach Diffusion-DPO's final reward.

Runs the full digits demo (or reads a finished one) and prints, for each method, the training steps at
which its same-seed hidden reward first reaches Diffusion-DPO's final reward, and the ratio
steps(Diffusion-DPO) / steps(method): the paper reports ~1.5x (Fig. 4) for xDPO on SD1.5.

    python benchmarks/demo_speedup.py [--out outputs/digits-demo] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/digits-demo")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from xdpo.apps.demo.run import run_demo

    run_demo(args.out, quick=args.quick)
    results = json.loads((Path(args.out) / "results.json").read_text())
    steps = results["steps_to_dpo_final"]
    dpo = steps.get("dpo")
    print(f"Diffusion-DPO final mean hidden reward: {results['dpo_final_reward']:.4f}")
    for slug, st in steps.items():
        ratio = f"{dpo / st:.2f}x" if st and dpo else "n/a"
        print(
            f"{slug:>10}: steps to reach it {st if st is not None else 'not reached'}; speed-up over DPO {ratio}"
        )


if __name__ == "__main__":
    main()
