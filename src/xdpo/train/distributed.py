"""The accelerator of a run: devices, mixed precision, trackers, and the distributed mode it really runs in.

- DDP: `accelerate launch` on several GPUs, or `torchrun` on CPUs (gloo).
- FSDP2 (`configs/accelerate/fsdp.yaml`, accelerate's `fully_shard` path): parameters, gradients and
  optimizer state sharded. Without GPUs accelerate 1.x quietly turns an FSDP config into plain
  multi-CPU data parallelism; xdpo then forces accelerate's own FSDP plugin back on (the GPU code
  path, over gloo), and says so. FSDP1 is refused: xdpo's LoRA reference runs the model in place.
- Gradient accumulation: `accelerator.accumulate` with `train.grad_accum` micro-batches per optimizer step.
- DeepSpeed ZeRO-1/2/3 (`configs/accelerate/deepspeed-zero{2,3}.yaml`): the engine steps inside
  `accelerator.backward` on the last micro-batch (its clipping is `train.max_grad_norm`, its accumulation
  `train.grad_accum`, its micro-batch `train.batch_size` pairs: xdpo writes them into the DeepSpeed config);
  DeepSpeed skips a step whose gradients are not finite. Without GPUs xdpo forces accelerate's DeepSpeed
  state on (gloo), as for FSDP, and says so.
The run's first lines state the mode, and under FSDP or ZeRO-3 how many parameters this process holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import XdpoError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


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
    if deepspeed_requested() and kind == DistributedType.MULTI_CPU:
        _force_deepspeed(accelerator, t.mixed_precision)
        kind = state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg)
    if kind == DistributedType.FSDP and state.fsdp_plugin.fsdp_version != 2:
        raise XdpoError("FSDP version 1 is not supported: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    return accelerator


def _force_deepspeed(accelerator: Any, mixed_precision: str) -> None:
    """accelerate's DeepSpeed state on CPU processes (accelerate turns it into MULTI_CPU): the GPU code path
    over gloo. DeepSpeed's CPU backend joins the torch process group accelerate already made."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin()  # from the environment `accelerate launch` (or the test) exports
    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state = accelerator.state
    state.distributed_type, state.deepspeed_plugins = DistributedType.DEEPSPEED, plugin
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.deepspeed_engine_wrapped = None
    accelerator.native_amp = False
    accelerator.print("DeepSpeed requested without GPUs: accelerate's DeepSpeed state forced on (gloo)")


def configure_deepspeed(accelerator: Any, cfg: Any) -> None:
    """The DeepSpeed config's batch, accumulation and clipping from the xdpo config (the one source of truth;
    a disagreeing value in the accelerate/DeepSpeed config is overridden and said so)."""
    t = cfg.train
    plugin = accelerator.state.deepspeed_plugin
    if int(plugin.zero_stage) == 0:
        raise XdpoError(
            "DeepSpeed ZeRO stage 0 is plain data parallelism: use DDP (configs/accelerate/ddp.yaml)"
        )
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            accelerator.print(f"DeepSpeed config {key}={ds[key]} ignored: the xdpo config sets {value}")
        ds[key] = value
    ds.pop("train_batch_size", None)  # DeepSpeed derives it (micro batch x accumulation x processes)
    if "optimizer" in ds or "scheduler" in ds:
        raise XdpoError(
            "DeepSpeed config: remove its `optimizer` / `scheduler` sections: train.optimizer, "
            "train.learning_rate and train.warmup_steps set them"
        )
    plugin.gradient_clipping, plugin.gradient_accumulation_steps = t.max_grad_norm, t.grad_accum
    # ZeRO-3 makes transformers (and diffusers) load every model under `deepspeed.zero.Init`, partitioned:
    # the frozen text encoders would then run with empty weights. Models load whole (as on one GPU);
    # deepspeed.initialize partitions the denoiser (and only it) in `prepare`.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    plugin.dschf = None


def deepspeed_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None for any other mode."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def policy_autocast(accelerator: Any, model: Any) -> Any:
    """DeepSpeed casts the model to bf16/fp16 and does not autocast: run its forward (and the reference's,
    through the returned context) under torch.autocast, as accelerate does for its own mixed precision.
    The precision is the one DeepSpeed runs in (its config's bf16/fp16 sections)."""
    mixed_precision = accelerator.mixed_precision
    if deepspeed_stage(accelerator) is None or mixed_precision == "no":
        return accelerator.autocast
    from functools import partial

    from xdpo.models.load import DTYPES

    context = partial(torch.autocast, accelerator.device.type, dtype=DTYPES[mixed_precision])
    forward = model.forward
    model.forward = lambda *a, **kw: _autocast_call(context, forward, *a, **kw)
    return context


def _autocast_call(context: Any, forward: Any, *a: Any, **kw: Any) -> Any:
    with context():
        return forward(*a, **kw)


def clip_grad_norm(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` (returns the norm before clipping, scales by max_norm / (norm + 1e-6)
    when that is below 1), without its rescaling pass when nothing is clipped: a pass over every gradient,
    2% of a digits-base full fine-tune step on a CPU. Only on the CPU (elsewhere the test `norm <= max_norm`
    would wait for the device every step); sharded and fp16-scaled gradients go through accelerate. The
    norm and the scaling are torch's public `get_total_norm` / `clip_grads_with_norm_` (the values of
    `clip_grad_norm_`, bit for bit)."""
    plain = (
        accelerator.distributed_type.name in ("NO", "MULTI_CPU")
        and accelerator.scaler is None
        and accelerator.device.type == "cpu"
    )
    if not plain or not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return accelerator.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if not float(norm) + 1e-6 <= max_norm:  # (a non-finite norm clips too, as in torch)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def optimizer_step(accelerator: Any, optimizer: Any) -> None:
    """`optimizer.step()`. Without a gradient scaler, outside XLA and DeepSpeed, with the gradients in sync,
    accelerate's `AcceleratedOptimizer.step` only calls the torch optimizer's step, after looking up an
    optional package twice (`is_lomo_available`: a sys.path search, ~0.35 ms a step on a CPU): call it."""
    from accelerate.optimizer import AcceleratedOptimizer

    if (
        type(optimizer) is AcceleratedOptimizer
        and accelerator.scaler is None
        and accelerator.sync_gradients
        and accelerator.distributed_type.name not in ("XLA", "DEEPSPEED", "MEGATRON_LM")
    ):
        optimizer.optimizer.step()
    else:
        optimizer.step()


def is_fsdp(accelerator: Any) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def is_partitioned(accelerator: Any) -> bool:
    """Parameters split across processes (FSDP2, DeepSpeed ZeRO-3): forwards are collectives."""
    return is_fsdp(accelerator) or deepspeed_stage(accelerator) == 3


def local_fraction(model: Any) -> tuple[int, int]:
    """(parameters this process holds, parameters in the model): sharded DTensors count their local part,
    ZeRO-3 parameters their partition."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            total += p.ds_numel
            local += p.ds_tensor.numel()
            continue
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole (a collective: every process calls it): an FSDP2 DTensor, or a
    ZeRO-3 partitioned parameter (a copy); other tensors as they are."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    if hasattr(t, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([t]):
            return t.detach().clone()
    return t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (whole) laid out as `param`: sharded the same way when `param` is a DTensor (a ZeRO-3
    parameter keeps whole values: they are written into it under `GatheredParameters`)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(device=param.device, dtype=param.dtype)
