"""The accelerator of a run: devices, mixed precision, trackers, and the distributed mode it really runs in.

- DDP: `accelerate launch` on several GPUs, or `torchrun` on CPUs (gloo).
- FSDP2 (`configs/accelerate/fsdp.yaml`, accelerate's `fully_shard` path): parameters, gradients and
  optimizer state sharded. Without GPUs accelerate 1.x quietly turns an FSDP config into plain
  multi-CPU data parallelism; xdpo then forces accelerate's own FSDP plugin back on (the GPU code
  path, over gloo), and says so. FSDP1 is refused: xdpo's LoRA reference runs the model in place.
- Gradient accumulation: `accelerator.accumulate` with `train.grad_accum` micro-batches per optimizer step.
- DeepSpeed: refused with one line until its reference handling is tested on GPUs.
The run's first lines state the mode, and under FSDP how many parameters this process holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import XdpoError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def make_accelerator(cfg: Any, out: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration

    t = cfg.train
    cpu = ("LOCAL_RANK" in os.environ or "RANK" in os.environ) and not torch.cuda.is_available()
    plugin = FullyShardedDataParallelPlugin() if fsdp_requested() else None
    accelerator = Accelerator(
        cpu=cpu,  # several processes without GPUs (torchrun on CPU): gloo
        mixed_precision=t.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        fsdp_plugin=plugin,
        gradient_accumulation_steps=t.grad_accum,  # accumulate() and backward() (the loss / grad_accum)
    )
    # `accelerate launch --gradient_accumulation_steps N` (or its config) overrides the argument above
    if accelerator.gradient_accumulation_steps != t.grad_accum:
        accelerator.print(
            f"accelerate's gradient_accumulation_steps={accelerator.gradient_accumulation_steps} ignored: "
            f"train.grad_accum={t.grad_accum} sets it"
        )
        accelerator.gradient_accumulation_steps = t.grad_accum
    state = accelerator.state
    if plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # read again by prepare()
        accelerator.print("FSDP requested without GPUs: accelerate's FSDP plugin forced on (gloo)")
    kind = state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise XdpoError(
            "DeepSpeed is not supported yet (its reference and checkpoint handling are untested); use FSDP: "
            "accelerate launch --config_file configs/accelerate/fsdp.yaml -m xdpo train ..."
        )
    if kind == DistributedType.FSDP and state.fsdp_plugin.fsdp_version != 2:
        raise XdpoError("FSDP version 1 is not supported: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    return accelerator


def clip_grad_norm(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` (returns the norm before clipping, scales by max_norm / (norm + 1e-6)
    when that is below 1), without its rescaling pass when nothing is clipped: a pass over every gradient,
    2% of a digits-base full fine-tune step on a CPU. Only on the CPU (elsewhere the test `norm <= max_norm`
    would wait for the device every step); sharded and fp16-scaled gradients go through accelerate."""
    plain = (
        accelerator.distributed_type.name in ("NO", "MULTI_CPU")
        and accelerator.scaler is None
        and accelerator.device.type == "cpu"
    )
    if not plain or not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return accelerator.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not float(norm) + 1e-6 <= max_norm:  # (a non-finite norm clips too, as in torch)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def is_fsdp(accelerator: Any) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def local_fraction(model: Any) -> tuple[int, int]:
    """(parameters this process holds, parameters in the model): sharded DTensors count their local part."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (a collective: every process calls it); other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (whole) laid out as `param`: sharded the same way when `param` is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(device=param.device, dtype=param.dtype)
