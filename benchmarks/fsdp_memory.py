"""FSDP2 and DeepSpeed ZeRO-2/3 on 2 processes vs 1 process: parameter and optimizer-state bytes each
process holds.

Runs `xdpo train` (full fine-tune, AdamW) for `--steps` steps on a random UNet with SD 1.5's block layout
and `--widths` channels (default (64, 128, 256, 256): ~34M parameters), once as a single process and
once per mode under `torchrun --nproc_per_node 2` with accelerate's FSDP2 plugin or DeepSpeed (over gloo
on CPU, forced on as tests/test_fsdp.py and tests/test_deepspeed.py do). After the last step each process
counts the bytes of the tensors it holds: the denoiser's parameters (DTensor local shards, ZeRO-3
partitions), AdamW's moments, DeepSpeed's fp32 master partitions (the weights the optimizer updates;
fp32 runs have them too), and the frozen reference copy (not sharded: a full copy per process). Prints
the per-process bytes and the 2-process / 1-process ratios: expected ~0.5 for the parameters under FSDP
and ZeRO-3 (1.0 under ZeRO-2) and for the optimizer moments under all three.

    python benchmarks/fsdp_memory.py [--widths 64,128,256,256] [--steps 1] [--modes fsdp,zero2,zero3]
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
DS_ENV = {  # `accelerate launch --config_file configs/accelerate/deepspeed-zero{2,3}.yaml` (tests/test_deepspeed.py)
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
}
MODES = {
    "fsdp": FSDP_ENV,
    "zero2": {**DS_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {**DS_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
}


def local_bytes(t: Any) -> int:
    """Bytes of the part of `t` this process holds (a DTensor's local shard, a ZeRO-3 partition)."""
    t = t.to_local() if hasattr(t, "to_local") else t.ds_tensor if hasattr(t, "ds_tensor") else t
    return t.numel() * t.element_size()


def child(args: argparse.Namespace) -> None:
    """Train in this process (one rank of torchrun, or alone); report what this process holds."""
    import torch

    torch.set_num_threads(1)
    from xdpo.config import load_config
    from xdpo.train import checkpoint, recipe, setup

    report: dict = {}

    def count(
        accelerator: Any, unet: Any, cfg: Any, comps: Any, final: Path, step: int, **kw: Any
    ) -> None:  # in place of save_final: after the last step
        final.mkdir(parents=True, exist_ok=True)
        opt = accelerator._optimizers[0].optimizer
        masters = [  # DeepSpeed ZeRO-1/2 and ZeRO-3 keep the fp32 partitions the optimizer updates here
            *getattr(opt, "single_partition_of_fp32_groups", []),
            *getattr(opt, "fp32_partitioned_groups_flat", []),
        ]
        opt = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
        states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        ref = loop_models["reference"].storage.ref_model
        report.update(
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            mode=accelerator.distributed_type.name,
            params=sum(local_bytes(p) for p in unet.parameters()),
            optimizer=sum(local_bytes(v) for v in states),
            masters=sum(local_bytes(v) for v in masters),
            reference=sum(local_bytes(p) for p in ref.parameters()),
        )

    loop_models: dict = {}
    real = setup.load_models

    def keep(cfg: Any, device: Any, objective: Any) -> Any:
        models = real(cfg, device, objective)
        loop_models["reference"] = models.reference
        return models

    setup.load_models, checkpoint.save_final = keep, count
    checkpoint.save_checkpoint = lambda *a, **k: None
    cfg = load_config(
        None,
        [
            f"model.pretrained={args.pipe}", f"data.path={args.pairs}", "data.resolution=32",
            f"output_dir={args.out}", f"train.max_steps={args.steps}", "train.batch_size=1",
            "train.checkpoint_every=0", "train.learning_rate=1e-6", "train.scale_lr=false", "train.warmup_steps=0",
        ],
    )  # fmt: skip
    recipe.train(cfg)
    sys.stdout.write("FSDP-MEMORY " + json.dumps(report) + "\n")  # one write: ranks share the pipe
    sys.stdout.flush()


def launch(
    world: int, args: argparse.Namespace, pipe: Path, pairs: Path, out: Path, mode: str = ""
) -> list[dict]:
    script = [__file__, "--child", "--pipe", str(pipe), "--pairs", str(pairs), "--out", str(out)]
    script += ["--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), *script]
        env.update(MODES[mode])
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

    from xdpo.models.small import build_pipeline

    path = build_pipeline("StableDiffusionPipeline", out, sample_size=16)
    config = {**SD15_UNET, "block_out_channels": list(widths), "cross_attention_dim": 32, "sample_size": 16}
    UNet2DConditionModel(**config).save_pretrained(path / "unet")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="64,128,256,256", help="block_out_channels (multiples of 32)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--modes", default="fsdp,zero2,zero3", help="2-process modes to compare with 1 process")
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
        runs = {mode: launch(2, args, pipe, pairs, tmp / mode, mode) for mode in args.modes.split(",")}
    mib = 2**20
    print(
        f"\nfull fine-tune, AdamW, UNet block_out_channels {widths}, {args.steps} step(s); MiB held per process"
    )
    print(f"{'run':<30} {'parameters':>11} {'AdamW state':>12} {'fp32 masters':>13} {'reference':>10}")

    def line(label: str, r: dict) -> str:
        return (f"{label:<30} {r['params'] / mib:11.2f} {r['optimizer'] / mib:12.2f} {r['masters'] / mib:13.2f} "
                f"{r['reference'] / mib:10.2f}")  # fmt: skip

    print(line(f"1 process ({one['mode']})", one))
    for mode, two in runs.items():
        for r in two:
            print(line(f"{mode}: 2 processes, rank {r['rank']}", r))
    print("\n2 processes / 1 process, per process (the most any rank holds):")
    for mode, two in runs.items():
        ratios = {key: max(r[key] for r in two) / one[key] for key in ("params", "optimizer", "reference")}
        print(f"  {mode:<6} parameters {ratios['params']:.3f}  AdamW state {ratios['optimizer']:.3f}  reference "
              f"{ratios['reference']:.3f} (not sharded: a full copy per process)")  # fmt: skip


if __name__ == "__main__":
    main()
