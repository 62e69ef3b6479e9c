"""Seconds per training step and peak memory per model family, on the tiny pipelines (CPU).

One step = `train_step` (VAE encode, text encoders, reference forward, policy forward on [w; l],
the loss) + backward + AdamW step, on a batch of `--batch` pairs at 16 x 16 px (latents 8 x 8), for
the tiny SD, SDXL, SD3 (with and without T5), Flux, Qwen-Image, FLUX.2 (dev, klein), Z-Image and Wan
pipelines of `xdpo.models.small`, full fine-tune and LoRA (rank 4); Wan on pairs of 5-frame 32 x 32 px
clips (latents 2 x 8 x 8). Text encoders run at the pipelines' default max_sequence_length (SD3 256, the
others 512; Qwen-Image's and Z-Image's conditions are cut to the prompt's length before the denoiser)
unless `--max-seq-len` says otherwise.

Memory: each configuration runs in its own process; "peak step MiB" is the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs after loading) over its RSS before the
first step, i.e. what the steps themselves add (activations, gradients, optimizer state) on top of the
loaded models; "RSS MiB" is the process's RSS after loading (Python, torch and the pipeline).

    OMP_NUM_THREADS=1 python benchmarks/families.py [--steps 20] [--batch 2] [--threads 1]

Run it alone on the machine (docs/design.md §7: a second busy process distorts CPU timings badly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (label, pipeline folder name, extra overrides)
    ("sd", "sd", []),
    ("sdxl", "sdxl", []),
    ("sd3", "sd3", []),
    ("sd3 no T5", "sd3", ["family.text_encoder_3=false"]),
    ("flux", "flux", []),
    ("qwenimage", "qwenimage", []),
    ("flux2", "flux2", []),
    ("flux2 klein", "flux2_klein", []),
    ("zimage", "zimage", []),
    ("wan", "wan", ["data.resolution=32", "data.num_frames=5", "data.fps=8"]),
]
CLIPS = "wan"
"""The configuration trained on clip pairs."""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(pipeline: str, pairs: str, extra: list[str], lora: int, batch: int, steps: int, seq: int) -> dict:
    """Median step time and peak RSS growth of one configuration, in this process."""
    import torch

    from xdpo.config import load_config
    from xdpo.data import open_data
    from xdpo.train.optim import make_optimizer
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    overrides = [f"model.pretrained={pipeline}", f"data.path={pairs}", "data.resolution=16"]
    overrides += [f"model.lora_rank={lora}", f"family.max_sequence_length={seq}", *extra]
    cfg = load_config(None, overrides)
    m, models = single_process(cfg)
    opt = make_optimizer(cfg.train, models.params, 1e-4)
    _, data, _ = open_data(cfg)
    batches = [data.collate([data[(i * batch + j, i)] for j in range(batch)]) for i in range(4)]
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak()
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        out = train_step(m, batches[i % 4], torch.Generator().manual_seed(i))
        out.out.loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    return {
        "step_s": sorted(times)[len(times) // 2],
        "peak_step_mib": (peak - rss0) / 1024 if reset else float("nan"),
        "rss_mib": rss0 / 1024,
        "trainable": sum(p.numel() for p in models.params),
        "denoiser": sum(p.numel() for p in models.policy.parameters()),
    }


def make_pairs(path: Path, n: int = 16) -> Path:
    """n pairs of 24 x 24 px random images with short captions (Pick-a-Pic schema)."""
    import numpy as np
    from PIL import Image

    from xdpo.data import write_pairs_parquet

    rng = np.random.default_rng(0)

    def img() -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))

    captions = [f"a bright picture, number {i}" for i in range(n)]
    return write_pairs_parquet(
        path, captions, [img() for _ in range(n)], [img() for _ in range(n)], [1.0] * n
    )


def make_clip_pairs(folder: Path, n: int = 16) -> Path:
    """n pairs of 5-frame 24 x 24 px random mp4 clips (paths in a parquet file next to them)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xdpo.data.video import write_video

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(n):
        for j in (0, 1):
            write_video(
                list(rng.integers(0, 255, (5, 24, 24, 3), dtype=np.uint8)), folder / f"{i}_{j}.mp4", 8
            )
            rows[f"jpg_{j}"].append(f"{i}_{j}.mp4")
        rows["caption"].append(f"a bright clip, number {i}")
        rows["label_0"].append(1.0)
    pq.write_table(pa.table(rows), folder / "clips.parquet")
    return folder / "clips.parquet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=20, help="timed steps per configuration (after 3 warm-up steps)"
    )
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=0, help="T5 tokens; 0 = the pipeline's default")
    ap.add_argument(
        "--one", nargs=4, metavar=("PIPELINE", "PAIRS", "LORA", "EXTRA_JSON"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.one:  # a child: one configuration, one JSON line
        pipe, pairs, lora, extra = args.one
        res = measure(pipe, pairs, json.loads(extra), int(lora), args.batch, args.steps, args.max_seq_len)
        print("RESULT " + json.dumps(res))
        return

    from xdpo.models.small import build_all

    with tempfile.TemporaryDirectory(prefix="xdpo-bench-families-") as tmp:
        pipes = build_all(Path(tmp) / "pipes")
        pairs = make_pairs(Path(tmp) / "pairs.parquet")
        clips = make_clip_pairs(Path(tmp) / "clips")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        print(
            f"batch {args.batch} pairs, 16 x 16 px (wan: 5 x 32 x 32), {args.steps} timed steps, {args.threads} thread(s)"
        )
        header = (
            f"{'family':<12} {'mode':<5} {'s/step':>8} {'peak step MiB':>14} {'RSS MiB':>8} {'trainable':>10}"
        )
        print(header + "\n" + "-" * len(header), flush=True)
        for label, name, extra in CONFIGS:
            for lora in (0, 4):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    str(pipes[name]),
                    str(clips if name == CLIPS else pairs),
                    str(lora),
                    json.dumps(extra),
                ]
                cmd += [
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ]
                cmd += ["--max-seq-len", str(args.max_seq_len)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(f"{label:<12} {'lora' if lora else 'full':<5} failed: {proc.stderr.strip()[-500:]}")
                    continue
                r = json.loads(line[len("RESULT ") :])
                print(
                    f"{label:<12} {'lora' if lora else 'full':<5} {r['step_s']:>8.3f} {r['peak_step_mib']:>14.1f} "
                    f"{r['rss_mib']:>8.0f} {r['trainable']:>10,}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
