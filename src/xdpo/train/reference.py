"""Reference-model strategies: frozen, periodic (Kang et al. 2025, stable update) and EMA.

Three models take part: the policy (trained), the reference (in the loss) and the initial model.
- Full fine-tune: the reference is a frozen copy in reduced precision; with `periodic`/`ema` the
  initial model is a third copy (on the CPU with `reference.offload`, moved in only for checks).
- LoRA: one base UNet for all three. Initial = adapters disabled; the reference is a snapshot of the
  adapter weights run through `torch.func.functional_call` (no second UNet, no in-place swapping),
  or adapters disabled while the snapshot is empty (frozen, or after `reinit`).

`periodic`: every tau = `update_every` optimizer steps the candidate (the current policy) is checked:
D = mean over `divergence_samples` preferred images of the last micro-batch, with fresh (t, eps), of
mean_{C,H,W} (pred_candidate - pred_initial)^2 (`reference.divergence=pred_mse`, the forward-process
approximation of KL(candidate || initial), Kang et al. Eq. 7-8, without the time weighting), or of
e_candidate - e_initial (`error_gap`), in the per-element units of the loss; averaged over processes
so every process decides alike. D <= delta: the reference becomes the candidate. D > delta: `freeze` keeps the reference where it is for the rest of the run; `reinit`
resets it to the initial model (checks continue).
`ema`: ref <- decay * ref + (1 - decay) * policy every tau steps (Diffusion-KTO's reference EMA).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from xdpo.config import ReferenceConfig
from xdpo.models.load import adapters_disabled, frozen_copy


def _call(unet: Any, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    """A frozen copy in its own dtype (e.g. an fp16 reference next to an fp32 policy without autocast)."""
    dtype = next(unet.parameters()).dtype
    return unet(noisy.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample


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


def _trainable_state(unet: Any) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


class Reference:
    """The reference (and initial) model of a run and the state of its update strategy."""

    def __init__(
        self, cfg: ReferenceConfig, unet: Any, *, lora: bool, dtype: torch.dtype, device: torch.device
    ):
        self.cfg, self.lora, self.device = cfg, lora, device
        self.updates, self.frozen_step, self.last_divergence = 0, None, None
        self.snapshot: dict[str, Tensor] | None = None
        self.ref_unet = self.init_unet = None
        if lora:
            if cfg.strategy == "ema":
                self.snapshot = _trainable_state(unet)  # starts at the initial adapters
        else:
            # an EMA moves by (1 - decay) x small steps each update: below half precision's resolution
            self.ref_unet = frozen_copy(unet, torch.float32 if cfg.strategy == "ema" else dtype, device)
            if cfg.strategy == "periodic":
                self.init_unet = frozen_copy(unet, dtype, torch.device("cpu") if cfg.offload else device)

    # ---- forward passes (call under torch.inference_mode) --------------------------------------
    def forward(self, base: Any, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The reference prediction; `base` is the unwrapped policy UNet (used with LoRA)."""
        if not self.lora:
            return _call(self.ref_unet, noisy, t, cond)
        if self.snapshot is None:
            with adapters_disabled(base):
                return base(noisy, t, encoder_hidden_states=cond).sample
        with eval_mode(base):  # no LoRA dropout in the reference
            args, kwargs = (noisy, t), {"encoder_hidden_states": cond}
            return functional_call(base, self.snapshot, args, kwargs, strict=False).sample

    def initial_forward(self, base: Any, noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.lora:
            with adapters_disabled(base):
                return base(noisy, t, encoder_hidden_states=cond).sample
        init = self.init_unet if self.init_unet is not None else self.ref_unet
        offloaded = next(init.parameters()).device != noisy.device
        if offloaded:
            init.to(noisy.device)
        try:
            return _call(init, noisy, t, cond)
        finally:
            if offloaded:
                init.to("cpu")

    # ---- updates -----------------------------------------------------------------------------
    def maybe_update(
        self, step: int, policy: Any, divergence_fn: Callable[[], Tensor], reduce: Callable[[Tensor], Tensor]
    ) -> float | None:
        """After optimizer step `step`: update per the strategy; return D when a check ran."""
        cfg = self.cfg
        if cfg.strategy == "frozen" or self.frozen_step is not None or step % cfg.update_every:
            return None
        if cfg.strategy == "ema":
            self._blend(policy, 1.0 - cfg.ema_decay)
            self.updates += 1
            return None
        d = float(reduce(divergence_fn().detach().float().mean()))  # the same decision on every process
        self.last_divergence = d
        if d <= cfg.max_divergence:
            self._blend(policy, 1.0)
            self.updates += 1
        elif cfg.on_exceed == "freeze":
            self.frozen_step = step
        else:
            self._reset()
        return d

    @torch.no_grad()
    def _blend(self, policy: Any, weight: float) -> None:
        """ref <- (1 - weight) * ref + weight * policy (weight 1: a copy)."""
        if self.lora:
            current = _trainable_state(policy)
            if self.snapshot is None or weight == 1.0:
                self.snapshot = current
            else:
                for k, v in current.items():
                    self.snapshot[k].lerp_(v.to(self.snapshot[k].dtype), weight)
            return
        for p_ref, p in zip(self.ref_unet.parameters(), policy.parameters(), strict=True):
            p_ref.lerp_(p.detach().to(p_ref.dtype), weight) if weight < 1.0 else p_ref.copy_(p.detach())

    @torch.no_grad()
    def _reset(self) -> None:
        if self.lora:
            self.snapshot = None
        else:
            self.ref_unet.load_state_dict(self.init_unet.state_dict())

    # ---- checkpointing -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "frozen_step": self.frozen_step,
            "last_divergence": self.last_divergence,
        }

    def tensors(self) -> dict[str, Tensor]:
        """Weights to save with a checkpoint (nothing while the reference is the initial model)."""
        if self.cfg.strategy == "frozen":
            return {}
        if self.lora:
            return {} if self.snapshot is None else {k: v.contiguous() for k, v in self.snapshot.items()}
        return {k: v.contiguous() for k, v in self.ref_unet.state_dict().items()}

    def load(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.updates, self.frozen_step = state["updates"], state["frozen_step"]
        self.last_divergence = state.get("last_divergence")
        if self.cfg.strategy == "frozen":
            return
        if self.lora:
            self.snapshot = {k: v.to(self.device) for k, v in tensors.items()} or None
        elif tensors:
            self.ref_unet.load_state_dict(tensors)

    def metrics(self, divergence: float | None) -> dict[str, Any]:
        return {
            "ref_divergence": divergence,
            "ref_updates": self.updates,
            "ref_frozen_step": self.frozen_step,
        }
