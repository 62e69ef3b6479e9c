"""SePPO on winner-only digits data (issue: the seeds' methods as published): does it train, and does it
raise the hidden reward over the base? In one digits world (UNet or flow), 3 training seeds.

The data: the study's 1,000 labelled pairs from the world's base (`xdpo.apps.study.run._pairs`), reduced to a
winner-only table (the preferred image of every non-tied pair, no label column: `data.format=images`, every
row preferred). Rows, each trained and evaluated by the study's job runner (its held-out prompts and seeds,
`xdpo.apps.study.runner.run_job`), at the world's SePPO config (configs/digits-seppo.yaml,
digits-flow-seppo.yaml: the world's DPO beta and lr, 120 steps):

- `seppo`: SePPO on the winner-only table;
- `sft`: SFT on the same winners (from the pairs file: SFT reads pairs and trains on their winners), the
  supervised baseline SePPO's flipped losers must beat.

The report (report.md in --out): the final hidden reward with a 95% t interval over seeds, the same-seed win
rate against the base (one value per seed over the evaluation images, with its t interval), SePPO minus SFT
paired by seed, prompt alignment, and the flipper's counts (reference samples used as losers / winners /
skipped) from metrics.jsonl.

    python benchmarks/seppo_digits.py --world flow --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

WORLD = {  # world: (SePPO config, SFT config, beta, lr)
    "sd": ("digits-seppo.yaml", "digits-sft.yaml", 300.0, 3e-5),
    "flow": ("digits-flow-seppo.yaml", "digits-flow-sft.yaml", 10.0, 3e-5),
}
NAMES = {"sd": "digits UNet", "flow": "digits flow"}
STEPS = 120


def winners_table(pairs: Path) -> Path:
    """The preferred image and caption of every non-tied pair of a Pick-a-Pic file (next to it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pairs.with_name(pairs.stem + "-winners.parquet")
    if out.is_file():
        return out
    t = pq.read_table(pairs, columns=["caption", "jpg_0", "jpg_1", "label_0"]).to_pydict()
    keep = [i for i, lab in enumerate(t["label_0"]) if lab != 0.5]
    images = [t["jpg_0"][i] if t["label_0"][i] == 1.0 else t["jpg_1"][i] for i in keep]
    pq.write_table(pa.table({"image": images, "caption": [t["caption"][i] for i in keep]}), out)
    return out


def flipper_counts(folder: Path) -> dict[str, float]:
    """Shares of reference samples used as losers, winners, or skipped over the run (metrics.jsonl)."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    tot = {k: sum(r.get(k) or 0 for r in rows) for k in ("aaf_loser", "aaf_winner", "aaf_skipped")}
    n = sum(tot.values()) or 1
    return {k: v / n for k, v in tot.items()}


def _ci(m: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def report(out: Path, world: str, results: dict[str, list[dict]], base: list[float], flips: dict) -> str:
    import numpy as np

    from xdpo.apps.study.stats import diff_interval, final_rewards, t_interval, win_interval
    from xdpo.apps.study.stats import win as rate

    cfg, _, beta, lr = WORLD[world]
    md = [
        f"# SePPO on winner-only digits data ({NAMES[world]}, `{cfg}`: beta {beta:g}, lr {lr:g}, {STEPS} steps)",
        "",
        f"Base: hidden reward {np.mean(base):.3f} on the same evaluation images. "
        f"{len(next(iter(results.values())))} training seeds; intervals: Student-t 95% over seeds.",
        "",
        "| method | hidden reward [95% CI] | per seed | win rate vs base | per seed | prompt alignment |",
        "|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        rew = final_rewards(runs)
        win = _ci(*win_interval(runs, base), digits=2)
        wins = ", ".join(f"{rate(r['final']['reward'], base):.2f}" for r in runs)
        align = np.mean([np.mean(r["final"]["alignment"]) for r in runs])
        md.append(
            f"| {key} | {_ci(*t_interval(rew))} | {', '.join(f'{x:.3f}' for x in rew)} | {win} | {wins} "
            f"| {align:.2f} |"
        )
    if {"seppo", "sft"} <= set(results):
        md += [
            "",
            f"SePPO minus SFT, paired by seed: {_ci(*diff_interval(results['seppo'], results['sft']))}.",
        ]
    if flips:
        shares = "; ".join(
            f"seed {s}: {f['aaf_loser']:.0%} losers, {f['aaf_winner']:.0%} winners, {f['aaf_skipped']:.0%} skipped"
            for s, f in flips.items()
        )
        md += ["", f"SePPO's flipper (reference samples over the run): {shares}."]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=tuple(WORLD), default="flow")
    ap.add_argument("--out", default=None, help="default: outputs/seppo/<world>")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1, help="single-thread training processes at once")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from xdpo.apps.study.plan import Job, StudySettings
    from xdpo.apps.study.run import _pairs
    from xdpo.apps.study.runner import evaluator, image_stats, run_jobs

    world = args.world
    seppo_cfg, sft_cfg, beta, lr = WORLD[world]
    out = Path(args.out or f"outputs/seppo/{world}")
    seeds = tuple(int(x) for x in args.seeds.split(","))
    s = StudySettings(out, worlds=(world,), steps=STEPS, seeds=seeds, workers=args.workers, curve_points=0)
    print(f"pairs: {_pairs(world, s)}", flush=True)
    winners = winners_table(out / "pairs" / f"{world}.parquet")
    images = ("data.format=images", f"data.path={winners}", "data.columns=image:image,caption:caption")
    rows = {"seppo": (seppo_cfg, images), "sft": (sft_cfg, ())}
    jobs = {(k, seed): Job(world, "main", k, cfg, beta, lr, seed, STEPS, 0, over)
            for k, (cfg, over) in rows.items() for seed in seeds}  # fmt: skip
    done = run_jobs(list(jobs.values()), s, "seppo")
    results = {k: [done[jobs[(k, seed)].name] for seed in seeds] for k in rows}
    ev = evaluator(world, s.eval_seeds, 1000)
    base = [float(x) for x in image_stats(ev, ev.base_images)["reward"]]
    flips = {seed: flipper_counts(s.out / "runs" / jobs[("seppo", seed)].name) for seed in seeds}
    print(report(s.out, world, results, base, flips))


if __name__ == "__main__":
    main()
