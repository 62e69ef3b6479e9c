"""Where a full fine-tune's frozen reference copy lives (`reference.place`), for denoisers of 10-30B parameters
whose policy, optimizer state and a whole second copy do not fit one device together.

- `device` (default): a whole copy on every process.
- `cpu`: the copy's transformer blocks (the model's `_no_split_modules`, diffusers' own unit of offloading)
  stay in CPU memory (pinned on CUDA machines) and each block's weights are copied to the device for its
  forward and dropped after it; the small rest (embedders, norms, projections) stays on the device. Costs one
  host-to-device copy of the reference per reference forward (about 40 GB for a 20B bf16 model). Updates of
  a moving reference (periodic, ema) write into the CPU copy.
- `sharded`: each process holds 1 / N of the copy, gathered block by block in the forward, as the policy is:
  FSDP2's `fully_shard` per block and at the root (under FSDP), or a DeepSpeed ZeRO-3 inference engine
  (under ZeRO-3, as TRL prepares its reference). Frozen references only (a moving reference blends whole
  weights).
"""

from __future__ import annotations

from typing import Any

import torch

from xdpo.errors import ConfigError, XdpoError

PLACES = ("device", "cpu", "sharded")


def cpu_copy(model: Any, dtype: torch.dtype) -> Any:
    """A frozen copy of `model` in CPU memory in `dtype`, made tensor by tensor (no second copy on the device;
    the module built on the meta device, its buffers real), in eval mode."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        copy = type(model).from_config(model.config)
    state = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
        for k, v in model.state_dict().items()
    }
    copy.load_state_dict(state, assign=True)
    return copy.to(dtype).requires_grad_(False).eval()


def blocks_of(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks: the outermost modules whose class its `_no_split_modules` names (a UNet's
    up block holds named resnet and attention blocks: the up block is the unit)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():  # parents before children
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            blocks.append(m)
            inside.update(id(c) for c in m.modules())
    if not blocks:
        raise ConfigError(
            f"reference.place: {type(model).__name__} names no blocks (_no_split_modules) to offload or shard; "
            "use reference.place=device"
        )
    return blocks


def stream_from_cpu(model: Any, device: torch.device) -> Any:
    """Keep `model`'s blocks on the CPU and bring each block's weights to `device` for its forward only."""
    model.to(device)
    pin = torch.device(device).type == "cuda"
    for block in blocks_of(model):
        params = list(block.parameters()) + list(block.buffers())
        host = [t.data.to("cpu").pin_memory() if pin else t.data.to("cpu") for t in params]
        for t, h in zip(params, host, strict=True):
            t.data = h

        def bring(module: Any, args: Any, params: list = params, host: list = host) -> None:
            for t, h in zip(params, host, strict=True):
                t.data = h.to(device, non_blocking=True)

        def drop(module: Any, args: Any, out: Any, params: list = params, host: list = host) -> None:
            for t, h in zip(params, host, strict=True):
                t.data = h

        block.register_forward_pre_hook(bring)
        block.register_forward_hook(drop)
    return model


def shard_across_processes(model: Any, policy: Any, dtype: torch.dtype) -> Any:
    """The frozen copy sharded as the policy is: a ZeRO-3 inference engine when the policy's parameters are
    DeepSpeed-partitioned, else FSDP2 per block and at the root. Returns the module to call."""
    if not torch.distributed.is_initialized():
        raise XdpoError(
            "reference.place=sharded needs several processes under FSDP2 or DeepSpeed ZeRO-3 "
            "(accelerate launch --config_file configs/accelerate/fsdp.yaml or deepspeed-zero3.yaml)"
        )
    if any(hasattr(p, "ds_id") for p in policy.parameters()):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
        }
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # (DeepSpeed's eval returns None)
        return engine
    from torch.distributed.fsdp import fully_shard

    device = next(policy.parameters()).device
    for block in blocks_of(model):
        fully_shard(block)
    fully_shard(model)
    return model.to(device)  # (moves this process's shards only)
