"""FSDP2 on 2 processes vs 1 process: parameter and optimizer-state bytes each process holds.

Runs `xdpo train` (full fine-tune, AdamW) for `--steps` steps on a random UNet with SD 1.5's block layout
and `--widths` channels (default (64, 128, 256, 256): ~34M parameters), once as a single process and
once under `torchrun --nproc_per_node 2` with accelerate's FSDP2 plugin (over gloo on CPU, forced on as
tests/test_fsdp.py does). After the last step each process counts the bytes of the tensors it holds:
the denoiser's parameters and AdamW's state (the local shards of DTensors), and the frozen reference
copy (not sharded: a full copy per process). Prints the per-process bytes and the 2-process / 1-process
ratios (expected ~0.5 for the parameters and optimizer state).

    python benchmarks/fsdp_memory.py [--widths 64,128,256,256] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

FSDP_ENV = {  # what `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports (tests/test_fsdp.py)
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def local_bytes(t: Any) -> int:
    """Bytes of the part of `t` this process holds (a DTensor's local shard)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def child(args: argparse.Namespace) -> None:
    """Train in this process (one rank of torchrun, or alone); report what this process holds."""
    import torch

    torch.set_num_threads(1)
    from xdpo.config import load_config
    from xdpo.train import loop

    report: dict = {}

    def count(
        accelerator: Any, unet: Any, cfg: Any, comps: Any, final: Path, step: int
    ) -> None:  # in place of save_final: after the last step
        final.mkdir(parents=True, exist_ok=True)
        opt = accelerator._optimizers[0].optimizer
        states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        ref = loop_models["reference"].ref_unet
        report.update(
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            mode=accelerator.distributed_type.name,
            params=sum(local_bytes(p) for p in unet.parameters()),
            optimizer=sum(local_bytes(v) for v in states),
            reference=sum(local_bytes(p) for p in ref.parameters()),
        )

    loop_models: dict = {}
    real = loop.load_models

    def keep(cfg: Any, device: Any) -> Any:
        models = real(cfg, device)
        loop_models["reference"] = models[3]
        return models

    loop.load_models, loop.save_final = keep, count
    loop.save_checkpoint = lambda *a, **k: None
    cfg = load_config(
        None,
        [
            f"model.pretrained={args.pipe}", f"data.path={args.pairs}", "data.resolution=32",
            f"output_dir={args.out}", f"train.max_steps={args.steps}", "train.batch_size=1",
            "train.checkpoint_every=0", "train.learning_rate=1e-6", "train.scale_lr=false", "train.warmup_steps=0",
        ],
    )  # fmt: skip
    loop.train(cfg)
    print("FSDP-MEMORY " + json.dumps(report), flush=True)


def launch(world: int, args: argparse.Namespace, pipe: Path, pairs: Path, out: Path) -> list[dict]:
    script = [__file__, "--child", "--pipe", str(pipe), "--pairs", str(pairs), "--out", str(out)]
    script += ["--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), *script]
        env.update(FSDP_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines() if x.startswith("FSDP-MEMORY ")]
    if len(rows) != world:  # a gloo teardown abort after the work is done is tolerated (issue 9)
        raise SystemExit(f"{world}-process run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def build_pipeline(out: Path, widths: tuple[int, ...]) -> Path:
    """The tiny pipeline (32 px) with a random UNet of SD 1.5's block layout at `widths` channels."""
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).parent))
    from cache_speedup import SD15_UNET

    from xdpo.models.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(out, sample_size=16)
    config = {**SD15_UNET, "block_out_channels": list(widths), "cross_attention_dim": 32, "sample_size": 16}
    UNet2DConditionModel(**config).save_pretrained(path / "unet")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="64,128,256,256", help="block_out_channels (multiples of 32)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pipe", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from cache_speedup import make_pairs

    widths = tuple(int(c) for c in args.widths.split(","))
    with tempfile.TemporaryDirectory(prefix="xdpo-fsdp-mem-") as name:
        tmp = Path(name)
        pipe = build_pipeline(tmp / "pipe", widths)
        pairs = make_pairs(tmp / "pairs.parquet", 8, 32)
        one = launch(1, args, pipe, pairs, tmp / "one")[0]
        two = launch(2, args, pipe, pairs, tmp / "two")
    mib = 2**20
    print(
        f"\nfull fine-tune, AdamW, UNet block_out_channels {widths}, {args.steps} step(s); MiB held per process"
    )
    print(f"{'run':<27} {'parameters':>11} {'optimizer':>10} {'reference':>10}")
    print(f"{'1 process (' + one['mode'] + ')':<27} {one['params'] / mib:11.2f} {one['optimizer'] / mib:10.2f} "
          f"{one['reference'] / mib:10.2f}")  # fmt: skip
    for r in two:
        print(f"{'2 processes, rank ' + str(r['rank']) + ' (' + r['mode'] + ')':<27} {r['params'] / mib:11.2f} "
              f"{r['optimizer'] / mib:10.2f} {r['reference'] / mib:10.2f}")  # fmt: skip
    for key in ("params", "optimizer", "reference"):
        ratio = max(r[key] for r in two) / one[key]
        note = "not sharded: a full copy per process" if key == "reference" else "expected ~0.5"
        print(f"{key} per process, 2 processes / 1 process: {ratio:.3f} ({note})")


if __name__ == "__main__":
    main()
