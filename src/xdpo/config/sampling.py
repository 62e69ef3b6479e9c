"""The schema's sections that sample during a run: `online.*` (on-policy rounds: rollouts scored by a reward
model) and `validation.*` (fixed prompts and seeds sampled at checkpoints). See `xdpo.config.schema`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from xdpo.config.options import at_least, key, rule


@dataclass
class OnlineConfig:
    enabled: bool = key(
        False,
        "online training: every online.every steps a round of groups (online.per_prompt images per prompt) sampled "
        "from the policy and scored: best-vs-worst pairs for the pair objectives (online DPO), the groups with "
        "their advantages for the rollout objectives (nft, awm, dgpo)",
        formerly="train.online",
    )
    every: int = key(
        40,
        "optimizer steps per round (flow_grpo's online DPO regenerates every ~40; NFT, AWM, DGPO: 1)",
        formerly="train.online_every",
        **at_least(1),
    )
    prompts: str = key(
        "",
        "prompt set or file the rounds are sampled for (as `xdpo pairs --prompts`)",
        formerly="train.online_prompts",
    )
    prompts_per_round: int = key(
        0, "prompts drawn (seeded, without replacement) for each round; 0 = all of them", **at_least(0)
    )
    per_prompt: int = key(
        4,
        "images sampled per prompt each round (the group size K)",
        formerly="train.online_per_prompt",
        **rule(lambda v: v >= 2, "must be >= 2 (a pair)"),
    )
    scorer: str = key(
        "",
        "reward the rounds are scored with: a scorer, a weighted sum (pickscore:1,aesthetic:0.5) or a "
        "module:function plugin (as `xdpo pairs --scorer`)",
        formerly="train.online_scorer",
    )
    reward_norm: Literal["sum", "gdpo"] = key(
        "sum",
        "several rewards: sum = the weighted sum, then group advantages; gdpo = each reward normalised in its "
        "group before the weighted sum, then over the round (GDPO)",
    )
    advantage_std: Literal["global", "group"] = key(
        "global", "advantages (s - group mean) / std: std over the round (NFT, AWM codes) or the group"
    )
    min_gap: float | None = key(
        None,
        "online DPO: keep every pair with a score gap above this; empty = best vs worst",
        formerly="train.online_min_gap",
    )
    sample_steps: int = key(
        0, "sampling steps; 0 = the model's sampling defaults", formerly="train.online_sample_steps"
    )
    guidance: float | None = key(
        None,
        "classifier-free guidance scale; <= 1 samples without CFG (NFT, AWM); empty = the model's default",
    )
    scheduler: str = key(
        "default",
        "sampling scheduler (as `xdpo sample --scheduler`); flow models: default (Euler) or dpm++ (flow "
        "DPM-Solver)",
    )
    batch_images: int = key(16, "images per pipeline call (the sampling memory budget)", **at_least(1))
    keep_images: bool = key(
        False, "rollout rounds: also write every sampled image as PNG into the round folder"
    )
    labels: str = key(
        "",
        "a labelling file that scores the rounds instead of online.scorer: a person's numbers per image, "
        "the missing ones written for labelling (xdpo.rollout.labels; one process)",
    )
    heldout_scorer: str = key(
        "", "monitor only, never trained on: a reward whose mean over each round's images is logged"
    )
    monitor_images: int = key(
        8,
        "fixed (prompt, seed) images sampled each round to measure drift from round 0 (the initial model)",
        **at_least(0),
    )
    stop_on: int = key(
        0,
        "stop before a round when the held-out reward fell in each of the last N rounds (online.heldout_scorer; "
        "the best round's model is kept in output_dir/best); 0 = never",
        **at_least(0),
    )


@dataclass
class ValidationConfig:
    prompts: str = key(
        "",
        "validation images during training: a prompt file or named set (as `xdpo sample --prompts`); "
        "empty = no validation",
    )
    seeds: str = key("0,1", "seeds of every prompt (as `xdpo sample --seeds`), the same at every validation")
    every: int = key(
        250,
        "validate every N optimizer steps, at step 0 (the base model) and at the last step",
        **at_least(1),
    )
    scorers: list[str] = key(
        [],
        "rewards of the validation images, each as `xdpo pairs --scorer` takes it (a scorer name, "
        "module:function, a weighted sum in a YAML list item)",
    )
    held_out: str = key(
        "",
        "a reward the run does not train on (as `xdpo pairs --scorer`), watched for reward hacking; empty = none",
    )
    stop_on: int = key(
        0,
        "stop the run when the held-out reward has stayed below its best for N validations in a row, keeping "
        "the best weights in best/; 0 = never",
        **at_least(0),
    )
    steps: int = key(0, "sampling steps; 0 = the model's sampling defaults", **at_least(0))
    guidance: float | None = key(None, "guidance scale; empty = the model's sampling default")
