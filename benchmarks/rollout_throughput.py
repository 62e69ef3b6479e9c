"""Rollout throughput: images per second of the rollout engine against the call patterns it replaced.

Same model, prompts, seeds, sampling steps and guidance for every row; only how images are put into
pipeline calls differs:
- `one prompt a call`: online DPO's rounds before the engine (K images of one prompt per call);
- `xdpo pairs (8 a call)`: `xdpo pairs`' default `--batch-size 8` across prompts;
- `engine, B a call`: the engine at `online.batch_images` = B across prompts.
Each row samples the same N = prompts x K images (per-image generators: the same images in every row).
Rows are timed in an interleaved order, `--repeats` times, and the median is reported with the ratio
to the first row, so a shared machine's drift hits every row alike.

    python benchmarks/rollout_throughput.py [--model digits] [--prompts 16] [--per-prompt 4] [--steps 10]
        [--batches 32,64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from xdpo.apps.digits.data import train_prompts
    from xdpo.evaluate.pipeline import load_pipeline, sampling_defaults
    from xdpo.rollout.engine import RolloutEngine
    from xdpo.rollout.groups import plan_round

    d = sampling_defaults(a.model)
    pipe = load_pipeline(a.model, scheduler=d["scheduler"], device="cpu", dtype="fp32")
    records = [{"prompt": p} for p in train_prompts()[: a.prompts]]
    plan = plan_round(records, a.per_prompt, seed=0)
    jobs = plan.jobs(range(plan.n_groups))
    K = a.per_prompt
    rows = {"one prompt a call": K, "xdpo pairs (8 a call)": 8}
    rows |= {f"engine, {b} a call": int(b) for b in a.batches.split(",")}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(a.repeats):
        for name, b in rows.items():
            engine = RolloutEngine(pipe, steps=a.steps, guidance=d["guidance"], batch_images=b)
            t0 = time.perf_counter()
            if name == "one prompt a call":
                for g in range(plan.n_groups):
                    engine.sample(jobs[g * K : (g + 1) * K])
            else:
                engine.sample(jobs)
            times[name].append(time.perf_counter() - t0)
    first = statistics.median(next(iter(times.values())))
    print(f"{a.model}: {len(jobs)} images ({a.prompts} prompts x {K}), {a.steps} steps, guidance {d['guidance']}, "
          f"{a.threads} thread(s), median of {a.repeats}")  # fmt: skip
    print("| calls | images/s | speed-up |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {len(jobs) / med:.2f} | {first / med:.2f}x |")


if __name__ == "__main__":
    main()
