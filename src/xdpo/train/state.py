"""What a checkpoint holds beyond accelerate's state (`trainer_state.json`): the step, the data position,
the reference strategy's counters, the objective's running state, the non-finite-step counters and the
run's set-up (processes, batch, accumulation, LoRA rank) that resuming checks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xdpo.errors import XdpoError

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0
    pairs_seen: int = 0
    setup: dict[str, int] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    objective_state: Any = None
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        """The state saved in `checkpoint` (older checkpoints: `kto_window` is the objective's state)."""
        raw = json.loads((Path(checkpoint) / STATE_FILE).read_text())
        if "objective_state" not in raw and raw.get("kto_window"):
            raw["objective_state"] = raw["kto_window"]
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)

    def check_setup(self, setup: dict[str, int], checkpoint: Path, warn: Any) -> None:
        """Refuse another LoRA rank or text-encoder LoRA setting (the adapters would not load); warn when the data order changes."""
        saved = self.setup or setup
        if saved.get("lora_rank") != setup["lora_rank"]:
            raise XdpoError(
                f"train.resume_from: {checkpoint} was trained with model.lora_rank={saved.get('lora_rank')}, "
                f"not {setup['lora_rank']}"
            )
        if saved.get("lora_text_encoder", False) != setup.get("lora_text_encoder", False):
            raise XdpoError(
                f"train.resume_from: {checkpoint} was trained with model.lora_text_encoder="
                f"{str(saved.get('lora_text_encoder', False)).lower()}; set it so to resume"
            )
        if saved != setup:
            warn(f"Warning: resuming with {setup} instead of {saved}: the data order changes")
