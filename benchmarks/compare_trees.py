"""Step time of `xdpo train` in two source trees at equal model, data, batch and thread count: the ratio
new / old of the median step time (metrics.jsonl `step_time`, after warm-up), cached and uncached.

For a change to the training loop (e.g. the recipe rebuild): check out the old revision's `src/` somewhere
(`git archive REV src | tar -x -C /tmp/old`) and run

    python benchmarks/compare_trees.py --old /tmp/old/src --new src --reps 3 --jobs 8

Each run is its own process with one torch thread; runs of both trees interleave (rep by rep), and with
`--jobs N` up to N run at once (each on its own core: give it a machine with that many idle cores). Cases:
the digits base (full and LoRA r=8, batch 8) and an SD 1.5-shaped tiny UNet at 16 px latents (full and LoRA,
batch 4), each uncached and from a latent cache built by the same tree. Prints one row per case:
median step time (ms) of each tree, the ratio new / old and its spread over reps (min-max of per-rep ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHILD = """
import sys, torch
torch.set_num_threads(1)
from xdpo.config import load_config
try:
    from xdpo.train.recipe import train
except ImportError:
    from xdpo.train.loop import train
args = sys.argv[1:]
if args[0] == "cache":
    from xdpo.train.cache_cli import build_cache
    build_cache(load_config(None, args[1:]))
else:
    train(load_config(None, args))
"""

CASES = {  # name: (pipeline key, batch, lora rank, resolution)
    "digits-full": ("digits", 8, 0, 32),
    "digits-lora": ("digits", 8, 8, 32),
    "sd15-16px-full": ("tiny", 4, 0, 32),
    "sd15-16px-lora": ("tiny", 4, 8, 32),
}


def run(src: str, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        subprocess.run(
            [sys.executable, "-c", CHILD, *args], env=env, check=True, stdout=f, stderr=subprocess.STDOUT
        )


def median_step(out: Path, warmup: int) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time"] for r in rows[warmup:])


def job(
    tree: str, src: str, case: str, cached: bool, rep: int, root: Path, pipes: dict, pairs: Path, steps: int
):
    pipe, batch, lora, res = CASES[case]
    name = f"{tree}-{case}-{'cached' if cached else 'plain'}-{rep}"
    base = [f"model.pretrained={pipes[pipe]}", f"data.path={pairs}", f"data.resolution={res}",
            f"model.lora_rank={lora}", f"train.batch_size={batch}", f"train.max_steps={steps}",
            "train.checkpoint_every=0", "train.warmup_steps=0", "train.learning_rate=1e-6", "train.scale_lr=false",
            "loss.beta=300", f"output_dir={root / name}"]  # fmt: skip
    if cached:
        cache = root / f"cache-{tree}-{case}"
        if not (cache / "manifest.json").is_file():
            run(src, ["cache", *base, f"data.cache={cache}"], root / f"{name}.cache.log")
        base.append(f"data.cache={cache}")
    run(src, base, root / f"{name}.log")
    return (tree, case, cached, rep), median_step(root / name, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the old tree's src/ folder")
    ap.add_argument("--new", required=True, help="the new tree's src/ folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--digits", default="", help="the digits base folder (default: the new tree's shipped one)"
    )
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    root = Path(tempfile.mkdtemp(prefix="xdpo-trees-"))
    sys.path.insert(0, args.new)
    from xdpo.models.small.pipelines import build_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_pairs_parquet

    digits = args.digits or str(Path(args.new) / "xdpo/apps/digits/assets/digits-base")
    pipes = {
        "digits": digits,
        "tiny": str(build_pipeline("StableDiffusionPipeline", root / "tiny", sample_size=16)),
    }
    pairs = make_pairs_parquet(root / "pairs.parquet", n=64, size=(40, 36))
    todo = [(tree, src, case, cached, rep) for rep in range(args.reps) for case in cases for cached in (False, True)
            for tree, src in (("old", args.old), ("new", args.new))]  # fmt: skip
    # the caches are built by each tree's first rep (serially), so the timed runs never include them
    first = [t for t in todo if t[4] == 0]
    rest = [t for t in todo if t[4] > 0]
    results = {}
    for batch in (first, rest):
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(job, *t, root, pipes, pairs, args.steps) for t in batch]
            for f in futures:
                key, value = f.result()
                results[key] = value
    print(f"{'case':<28} {'old ms':>8} {'new ms':>8} {'new/old':>8} {'spread':>15}")
    for case in cases:
        for cached in (False, True):
            old = [results[("old", case, cached, r)] for r in range(args.reps)]
            new = [results[("new", case, cached, r)] for r in range(args.reps)]
            ratios = [n / o for n, o in zip(new, old, strict=True)]
            name = f"{case} {'cached' if cached else 'uncached'}"
            print(f"{name:<28} {1e3 * statistics.median(old):8.2f} {1e3 * statistics.median(new):8.2f} "
                  f"{statistics.median(new) / statistics.median(old):8.3f} {min(ratios):7.3f}-{max(ratios):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
