"""Reference-model strategies: frozen, periodic (Kang et al. 2025, stable update) and EMA.

Three models take part: the policy (trained), the reference (in the loss) and the initial model.
- Full fine-tune: the reference is a frozen copy in reduced precision (fp32 for `ema`); with `periodic`
  the initial model is a third copy (on the CPU with `reference.offload`, moved in only for checks).
- LoRA: one base denoiser for all three. Initial = adapters disabled; the reference is a snapshot of
  the adapter weights run through `torch.func.functional_call` (no second copy, no in-place swapping),
  or adapters disabled while the snapshot is empty (frozen, or after `reinit`). `ema` is refused with
  LoRA (an average of A and B separately is not an average of the weights B A).

`periodic`: every tau = `update_every` optimizer steps the candidate (the current policy) is checked on
a fixed probe set drawn once from the data (`probe_size` preferred images, `probe_draws` fresh (t, eps)
each): D = mean of mean_{C,H,W} (pred_candidate - pred_initial)^2 (`reference.divergence=pred_mse`, the
forward-process approximation of KL(candidate || initial), Kang et al. Eq. 7-8, without the time
weighting), or of e_candidate - e_initial (`error_gap`), in the per-element units of the loss, with its
standard error; the per-image values are gathered from all processes, so every process decides alike.
D <= delta: the reference becomes the candidate. D > delta: `freeze` keeps the reference where it is for
the rest of the run; `reinit` resets it to the initial model (checks continue).
`ema`: ref <- decay * ref + (1 - decay) * policy every tau steps (Diffusion-KTO's reference EMA).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from xdpo.config import ReferenceConfig
from xdpo.models.families import Family
from xdpo.models.load import adapters_disabled, frozen_copy
from xdpo.train.distributed import full_tensor, like


def _cast(cond: dict[str, Tensor], dtype: torch.dtype, embeddings: tuple[str, ...]) -> dict[str, Tensor]:
    """The family's float embeddings in `dtype`; ids, sizes and guidance as they are (bf16 would round
    SDXL's 683 px to 684)."""
    return {k: v.to(dtype) if k in embeddings and v.is_floating_point() else v for k, v in cond.items()}


class _Predictor(torch.nn.Module):
    """`family.predict` as a module, so `functional_call` can run it with swapped adapter weights."""

    def __init__(self, family: Family, model: Any) -> None:
        super().__init__()
        self.family, self.model = family, model

    def forward(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.family.predict(self.model, noisy, t, cond)


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
    """The trained parameters, copied: FSDP2 keeps its shards, ZeRO-3 parameters are gathered whole."""
    return {
        n: full_tensor(p) if hasattr(p, "ds_id") else p.detach().clone()
        for n, p in unet.named_parameters()
        if p.requires_grad
    }


def _writable(params: list[Tensor]) -> Any:
    """Write whole values into parameters: ZeRO-3 ones are gathered, written, and re-partitioned on exit
    (every process writes the same values)."""
    if params and hasattr(params[0], "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        return GatheredParameters(params, modifier_rank=0)
    return nullcontext()


class Reference:
    """The reference (and initial) model of a run and the state of its update strategy."""

    def __init__(
        self,
        cfg: ReferenceConfig,
        family: Family,
        unet: Any,
        *,
        lora: bool,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.cfg, self.family, self.lora, self.device = cfg, family, lora, device
        self.base = unet  # the unwrapped policy denoiser (LoRA: also the reference and initial model)
        self.updates, self.frozen_step, self.last_divergence = 0, None, None
        self.last_se: float | None = None
        self.snapshot: dict[str, Tensor] | None = None
        self.probe: tuple[Tensor, dict[str, Tensor]] | None = None
        self.sharded = False  # FSDP2 / ZeRO-3: parameters partitioned, gathered by the model's forward hooks
        self.ref_unet = self.init_unet = None
        if not lora:
            # an EMA moves by (1 - decay) x small steps each update: below half precision's resolution
            self.ref_unet = frozen_copy(unet, torch.float32 if cfg.strategy == "ema" else dtype, device)
            if cfg.strategy == "periodic":
                self.init_unet = frozen_copy(unet, dtype, torch.device("cpu") if cfg.offload else device)

    # ---- forward passes (call under torch.inference_mode) --------------------------------------
    def _call(self, model: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """A frozen copy in its own dtype (e.g. an fp16 reference next to an fp32 policy without autocast)."""
        dtype = next(model.parameters()).dtype
        return self.family.predict(model, noisy.to(dtype), t, _cast(cond, dtype, self.family.embeddings))

    def predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The reference prediction."""
        if not self.lora:
            return self._call(self.ref_unet, noisy, t, cond)
        if self.snapshot is None:
            with adapters_disabled(self.base):
                return self.family.predict(self.base, noisy, t, cond)
        if self.sharded:  # FSDP gathers its own parameters: put the snapshot into them for this forward
            with eval_mode(self.base), self._swapped():
                return self.family.predict(self.base, noisy, t, cond)
        with eval_mode(self.base):  # no LoRA dropout in the reference
            weights = {f"model.{k}": v for k, v in self.snapshot.items()}
            predictor = _Predictor(self.family, self.base)
            return functional_call(predictor, weights, (noisy, t, cond), strict=False)

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

    def initial_predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if self.lora:
            with adapters_disabled(self.base):
                return self.family.predict(self.base, noisy, t, cond)
        init = self.init_unet if self.init_unet is not None else self.ref_unet
        offloaded = next(init.parameters()).device != noisy.device
        if offloaded:
            init.to(noisy.device)
        try:
            return self._call(init, noisy, t, cond)
        finally:
            if offloaded:
                init.to("cpu")

    def policy_predict(self, noisy: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        with eval_mode(self.base):  # the divergence check: no dropout
            return self.family.predict(self.base, noisy, t, cond)

    # ---- updates -----------------------------------------------------------------------------
    def set_probe(self, latents: Tensor, cond: dict[str, Tensor]) -> None:
        """This process's share of the fixed probe set (latents [K, C, h, w] and conditions [K, ...])."""
        self.probe = (latents, cond)

    def estimate(self, m: Any, step: int, seed: int, chunk: int) -> tuple[float, float]:
        """D and its standard error on the probe set, `probe_draws` fresh (t, eps) per image, all processes."""
        from xdpo.train.batches import mix_seed
        from xdpo.train.step import divergence_estimate

        latents, cond = self.probe
        values = []
        for draw in range(self.cfg.probe_draws):
            gen = torch.Generator(latents.device).manual_seed(mix_seed(seed, step, 1 << 30, draw, m.rank))
            for i in range(0, latents.shape[0], chunk):
                part = {k: v[i : i + chunk] for k, v in cond.items()}
                values.append(
                    divergence_estimate(
                        m,
                        self.policy_predict,
                        self.initial_predict,
                        latents[i : i + chunk],
                        part,
                        gen,
                        estimator=self.cfg.divergence,
                    )  # fmt: skip
                )
        d = m.gather(torch.cat(values).float()).double()  # every process sees every value: one decision
        se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else float("nan")
        return float(d.mean()), se

    def maybe_update(self, step: int, m: Any, seed: int, chunk: int = 8) -> float | None:
        """After optimizer step `step`: update per the strategy; return D when a check ran."""
        cfg, policy = self.cfg, self.base
        if cfg.strategy == "frozen" or self.frozen_step is not None or step % cfg.update_every:
            return None
        if cfg.strategy == "ema":
            self._blend(policy, 1.0 - cfg.ema_decay)
            self.updates += 1
            return None
        d, self.last_se = self.estimate(m, step, seed, chunk)
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
            p = full_tensor(p).detach()  # FSDP / ZeRO-3: the whole parameter (every process gathers alike)
            p_ref.lerp_(p.to(p_ref.dtype), weight) if weight < 1.0 else p_ref.copy_(p)

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
            "last_divergence_se": self.last_se,
        }

    def tensors(self) -> dict[str, Tensor]:
        """Weights to save with a checkpoint (nothing while the reference is the initial model)."""
        if self.cfg.strategy == "frozen":
            return {}
        if self.lora:
            if self.snapshot is None:
                return {}
            return {k: full_tensor(v).contiguous() for k, v in self.snapshot.items()}
        return {k: v.contiguous() for k, v in self.ref_unet.state_dict().items()}

    def load(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.updates, self.frozen_step = state["updates"], state["frozen_step"]
        self.last_divergence = state.get("last_divergence")
        self.last_se = state.get("last_divergence_se")
        if self.cfg.strategy == "frozen":
            return
        if self.lora:
            params = dict(self.base.named_parameters())
            self.snapshot = {k: like(v, params[k]) for k, v in tensors.items()} or None
        elif tensors:
            self.ref_unet.load_state_dict(tensors)

    def metrics(self, divergence: float | None) -> dict[str, Any]:
        return {
            "ref_divergence": divergence,
            "ref_divergence_se": self.last_se if divergence is not None else None,
            "ref_updates": self.updates,
            "ref_frozen_step": self.frozen_step,
        }
