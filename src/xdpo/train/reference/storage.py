"""Where the reference (and the initial model) live: LoRA adapters off / an adapter snapshot, or weight copies.

Three models take part in a run: the policy (trained), the reference (in the loss) and the initial model
(the base the divergence checks measure against).
- LoRA (`AdapterStorage`): one denoiser for all three. Initial = adapters disabled (peft's public
  per-layer `enable_adapters` switch); the reference is a snapshot of the adapter weights run through
  `torch.func.functional_call` (no second copy, no in-place swapping; under FSDP2 / ZeRO-3, whose
  forward hooks gather their own parameters, the snapshot is written into the adapters for the forward
  and restored exactly), or the initial model while the snapshot is empty.
- Full fine-tune (`CopyStorage`): the reference is a frozen copy in reduced precision (fp32 for an EMA,
  whose small steps fall below half precision's resolution), whole on the device, streamed block by block
  from the CPU, or sharded over the processes (`reference.place`, `placement.py`); strategies that move
  the reference keep the initial model as a third copy (on the CPU with `reference.offload`, moved in
  for checks).
Both move the reference the same ways: `blend` toward the policy, `anchor` toward the initial model
(exact for LoRA: it scales the snapshot's B factors), `reset`; `backup`/`restore` undo a staged candidate.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from xdpo.models.load import adapters_disabled, frozen_copy
from xdpo.train.distributed import full_tensor, like


def cast_embeddings(
    cond: dict[str, Tensor], dtype: torch.dtype, embeddings: tuple[str, ...]
) -> dict[str, Tensor]:
    """The family's float embeddings in `dtype`; ids, sizes and guidance as they are (bf16 would round
    SDXL's 683 px to 684 and Flux's guidance 3.7 to 3.703125)."""
    return {k: v.to(dtype) if k in embeddings and v.is_floating_point() else v for k, v in cond.items()}


@contextmanager
def eval_mode(module: Any):
    """Dropout off inside the block (the reference and the divergence check are deterministic)."""
    was_training = module.training
    if was_training:
        module.eval()
    try:
        yield module
    finally:
        if was_training:
            module.train()


class _Predictor(torch.nn.Module):
    """`family.predict` as a module, so `functional_call` can run it with swapped adapter weights."""

    def __init__(self, family: Any, model: Any) -> None:
        super().__init__()
        self.family, self.model = family, model

    def forward(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.family.predict(self.model, noisy, t, cond)


def trainable_state(model: Any) -> dict[str, Tensor]:
    """The trained parameters, copied: FSDP2 keeps its shards, ZeRO-3 parameters are gathered whole."""
    return {
        n: full_tensor(p) if hasattr(p, "ds_id") else p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _writable(params: list[Tensor]) -> Any:
    """Write whole values into parameters: ZeRO-3 ones are gathered, written, and re-partitioned on exit
    (every process writes the same values)."""
    if params and hasattr(params[0], "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        return GatheredParameters(params, modifier_rank=0)
    return nullcontext()


class AdapterStorage:
    """LoRA: policy, reference and initial model share one denoiser."""

    def __init__(self, family: Any, model: Any) -> None:
        self.family, self.base = family, model
        self.snapshot: dict[str, Tensor] | None = None
        self.sharded = False  # FSDP2 / ZeRO-3: parameters partitioned, gathered by the forward hooks

    def reference(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if self.snapshot is None:
            return self.initial(noisy, t, cond)
        if self.sharded:  # FSDP gathers its own parameters: put the snapshot into them for this forward
            with eval_mode(self.base), self._swapped():
                return self.family.predict(self.base, noisy, t, cond)
        with eval_mode(self.base):  # no LoRA dropout in the reference
            weights = {f"model.{k}": v for k, v in self.snapshot.items()}
            return functional_call(
                _Predictor(self.family, self.base), weights, (noisy, t, cond), strict=False
            )

    def initial(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        with adapters_disabled(self.base):
            return self.family.predict(self.base, noisy, t, cond)

    def policy(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        with eval_mode(self.base):  # the divergence check: no dropout
            return self.family.predict(self.base, noisy, t, cond)

    @contextmanager
    def sampling(self):
        """The denoiser with the reference's adapters (the initial model's while the snapshot is empty)."""
        with adapters_disabled(self.base) if self.snapshot is None else self._swapped():
            yield self.base

    @contextmanager
    def _swapped(self):
        """The adapter snapshot in place of the policy's adapters, restored on exit. Safe for autograd: the
        reference runs before the policy's forward, and the swap happens outside any graph."""
        params = dict(self.base.named_parameters())
        mine = [params[k] for k in self.snapshot]
        saved = {}
        with torch.no_grad(), _writable(mine):
            for k, v in self.snapshot.items():
                saved[k] = params[k].detach().clone()
                params[k].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad(), _writable(mine):
                for k, v in saved.items():
                    params[k].copy_(v)

    @torch.no_grad()
    def blend(self, weight: float) -> None:
        """reference <- (1 - weight) reference + weight policy, on the adapter weights (1: a copy)."""
        current = trainable_state(self.base)
        if self.snapshot is None or weight == 1.0:
            self.snapshot = current
            return
        for k, v in current.items():
            self.snapshot[k].lerp_(v.to(self.snapshot[k].dtype), weight)

    @torch.no_grad()
    def anchor(self, kappa: float) -> None:
        """reference <- reference + kappa (initial - reference), exactly: the initial model's adapter delta is
        0, so the reference's delta scale B A becomes (1 - kappa) scale B A by scaling its B factors."""
        if self.snapshot is None or kappa == 0.0:
            return
        for k, v in self.snapshot.items():
            if ".lora_B." in k:
                v.mul_(1.0 - kappa)

    def backup(self) -> dict[str, Tensor] | None:
        """A copy of the reference, to `restore` when a staged candidate is refused."""
        return None if self.snapshot is None else {k: v.clone() for k, v in self.snapshot.items()}

    def restore(self, saved: dict[str, Tensor] | None) -> None:
        self.snapshot = saved

    def reset(self) -> None:
        self.snapshot = None

    def tensors(self) -> dict[str, Tensor]:
        """Weights to save with a checkpoint (nothing while the reference is the initial model)."""
        if self.snapshot is None:
            return {}
        return {k: full_tensor(v).contiguous() for k, v in self.snapshot.items()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        params = dict(self.base.named_parameters())
        self.snapshot = {k: like(v, params[k]) for k, v in tensors.items()} or None


class CopyStorage:
    """Full fine-tune: the reference a frozen copy (on the device, streamed from the CPU, or sharded:
    `reference.place`, `placement.py`); the initial model a third copy when the reference moves."""

    def __init__(
        self,
        family: Any,
        model: Any,
        *,
        dtype: torch.dtype,
        device: torch.device,
        moves: bool,
        offload: bool,
        place: str = "device",
    ) -> None:
        self.family, self.base, self._sharded, self.place = family, model, False, place
        if place == "device":
            self.ref_model = frozen_copy(model, dtype, device)
        else:  # built in CPU memory: never a whole second copy on the device
            from xdpo.train.reference.placement import cpu_copy, stream_from_cpu

            self.ref_model = cpu_copy(model, dtype)
            if place == "cpu":
                stream_from_cpu(self.ref_model, device)
        self.init_model = None
        if moves:
            self.init_model = frozen_copy(model, dtype, torch.device("cpu") if offload else device)

    @property
    def sharded(self) -> bool:
        return self._sharded

    @sharded.setter
    def sharded(self, sharded: bool) -> None:
        """Told once models are prepared; `reference.place=sharded` shards the copy as the policy is."""
        self._sharded = sharded
        if self.place == "sharded":
            from xdpo.train.distributed import local_fraction
            from xdpo.train.reference.placement import shard_across_processes

            dtype = next(self.ref_model.parameters()).dtype
            self.ref_model = shard_across_processes(self.ref_model, self.base, dtype)
            held, total = local_fraction(self.ref_model)
            rank = torch.distributed.get_rank()
            print(
                f"reference: process {rank} holds {held:,} of {total:,} parameters ({held / total:.2f})",
                flush=True,
            )

    def _call(self, model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """A frozen copy in its own dtype (e.g. an fp16 reference next to an fp32 policy without autocast)."""
        dtype = next(model.parameters()).dtype
        return self.family.predict(
            model, noisy.to(dtype), t, cast_embeddings(cond, dtype, self.family.embeddings)
        )

    def reference(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self._call(self.ref_model, noisy, t, cond)

    def initial(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        init = self.init_model if self.init_model is not None else self.ref_model
        offloaded = init is self.init_model and next(init.parameters()).device != noisy.device
        if offloaded:
            init.to(noisy.device)
        try:
            return self._call(init, noisy, t, cond)
        finally:
            if offloaded:
                init.to("cpu")

    def policy(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        with eval_mode(self.base):
            return self.family.predict(self.base, noisy, t, cond)

    @contextmanager
    def sampling(self):
        """The reference copy (whole on every process)."""
        yield self.ref_model

    @torch.no_grad()
    def blend(self, weight: float) -> None:
        """reference <- (1 - weight) reference + weight policy (1: a copy); sharded weights gathered whole."""
        for p_ref, p in zip(self.ref_model.parameters(), self.base.parameters(), strict=True):
            p = full_tensor(p).detach()  # FSDP / ZeRO-3: the whole parameter (every process gathers alike)
            p = p.to(p_ref.device, p_ref.dtype)  # (a reference streamed from the CPU is updated there)
            p_ref.lerp_(p, weight) if weight < 1.0 else p_ref.copy_(p)

    @torch.no_grad()
    def anchor(self, kappa: float) -> None:
        """reference <- reference + kappa (initial - reference) (0: nothing)."""
        if kappa == 0.0:
            return
        for p_ref, p_init in zip(self.ref_model.parameters(), self.init_model.parameters(), strict=True):
            p_ref.lerp_(p_init.to(device=p_ref.device, dtype=p_ref.dtype), kappa)

    @torch.no_grad()
    def backup(self) -> list[Tensor]:
        """A copy of the reference's weights, beside the initial model's (on the CPU with `offload`), to
        `restore` when a staged candidate is refused."""
        device = next(self.init_model.parameters()).device
        return [p.detach().to(device, copy=True) for p in self.ref_model.parameters()]

    @torch.no_grad()
    def restore(self, saved: list[Tensor]) -> None:
        for p_ref, v in zip(self.ref_model.parameters(), saved, strict=True):
            p_ref.copy_(v.to(p_ref.device))

    @torch.no_grad()
    def reset(self) -> None:
        self.ref_model.load_state_dict(self.init_model.state_dict())

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.contiguous() for k, v in self.ref_model.state_dict().items()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        if tensors:
            self.ref_model.load_state_dict(tensors)
