"""`reference.strategy: stable` — Kang et al.'s stable reference update (AAAI-26), with xdpo's soft form.

Every tau = `update_every` optimizer steps:
1. the candidate: ref' = (1 - alpha) ref + alpha policy, then ref' <- ref' + kappa (initial - ref')
   (alpha = `reference.alpha`, kappa = `reference.anchor`);
2. the guard (Kang et al. Eq. 8): D of the candidate from the initial model on the probe set
   (`reference.divergence`, `kang` by default); D <= delta (`max_divergence`): ref <- ref'; D > delta:
   the reference stays the last one within delta and freezes for the rest of the run (`on_exceed: freeze`,
   "frozen near the delta-boundary"), or resets to the initial model (`reinit`, Kang et al.'s Table 3
   ablation; checks continue);
3. `ref_to_initial` and `ref_to_policy` (pred_mse on the probe, same draws), also once frozen.
The paper's update is alpha = 1, kappa = 0: a hard copy of the policy (its candidate), which is checked
without touching the reference. alpha < 1 and kappa > 0 are xdpo's extension (the circulating summaries'
soft update and anchor, not in the paper): the candidate is written into the reference, checked, and the
previous reference restored if refused. LoRA: the reference is an adapter snapshot; alpha must be 1
(blending the factors A and B separately is not a blend of B A), the anchor is exact (it scales B).
docs/math.md §6.
"""

from __future__ import annotations

from typing import Any

from xdpo.train.reference.strategy import Strategy


class Stable(Strategy):
    moves = saves = True
    default_divergence = "kang"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.copies = (
            cfg.alpha == 1.0 and cfg.anchor == 0.0
        )  # the paper's update: the candidate is the policy
        self.full_precision = not self.copies  # small blends vanish in 16 bits (as ema's)
        self.measured: dict[str, float] | None = None

    @staticmethod
    def check(cfg: Any) -> None:
        from xdpo.config import require

        require(
            cfg.model.lora_rank <= 0 or cfg.reference.alpha == 1.0,
            "reference.alpha",
            "< 1 with LoRA would blend the factors A and B separately, which is not a blend of the weights B A; "
            "use alpha=1 (Kang et al.'s copy; reference.anchor stays exact with LoRA) or a full fine-tune",
            cfg.reference.alpha,
        )

    def due(self, step: int) -> bool:
        return step % self.cfg.update_every == 0  # once frozen, only the distances are measured

    def update(self, step: int, storage: Any, check: Any) -> float | None:
        d = None if self.frozen_step is not None else self._guarded(step, storage, check)
        self.measured = check.distances()
        return d

    def _guarded(self, step: int, storage: Any, check: Any) -> float:
        cfg = self.cfg
        if self.copies:
            d, self.last_se = check()  # D of the policy, the candidate
        else:
            saved = storage.backup()
            storage.blend(cfg.alpha)
            storage.anchor(cfg.anchor)
            d, self.last_se = check.reference()  # D of the staged candidate
        self.last_divergence = d
        if d <= cfg.max_divergence:
            if self.copies:
                storage.blend(1.0)
            self.updates += 1
        elif cfg.on_exceed == "freeze":
            if not self.copies:
                storage.restore(saved)
            self.frozen_step = step
        else:
            storage.reset()
        return d

    def metrics(self, divergence: float | None) -> dict[str, Any]:
        row = super().metrics(divergence)
        measured, self.measured = self.measured or {}, None
        row["ref_to_initial"] = measured.get("initial")
        row["ref_to_policy"] = measured.get("policy")
        return row
