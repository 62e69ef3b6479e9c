"""`xdpo demo --online-rl`: offline Diffusion-DPO, online DPO, the decoupled methods (DiffusionNFT, AWM, DGPO)
and likelihood-based RL (GRPO with and without MixGRPO's window, DPOK, D3PO) at equal numbers of sampled images
and equal optimizer steps, trained on a noisy labeller, evaluated on the hidden reward.

Every arm is an `online.enabled` run of the digits config of its world (digits-dpo.yaml / digits-flow-dpo.yaml:
model, lr, batch, steps), with the same prompt pool (the 60 training captions, twice), K images per prompt at
the same sampling steps and the same training reward, `noisy_reward`: the hidden reward plus Gumbel noise of
scale 0.5, drawn from a hash of the image and prompt (a labeller that errs, reproducibly; comparing two such
noisy rewards is exactly the hidden labeller's Bradley-Terry choice at temperature 0.5, without its ties and
flips). Arms:
- offline Diffusion-DPO: one round of R x P prompts sampled from the base, best-vs-worst pairs, trained on for
  all R x E steps;
- online DPO: R rounds of P prompts (E steps each) from the current policy;
- nft, awm, dgpo: R rounds of P groups, the rollout objectives with their papers' defaults except the run's
  lr, batch and steps, the soft reference updated once a round;
- grpo (every step stochastic; and with MixGRPO's window of 4 SDE steps moved each round), dpok, d3po: R rounds
  of P groups sampled stochastically (DDIM eta 1 / Flow-GRPO's SDE), the papers' defaults except the run's lr,
  batch and steps, the frozen base as the reference of their KL / DPO terms;
- DGPO and D3PO (the best decoupled and likelihood-based arms of the three-seed runs before these two arms) with
  Kang et al.'s stable update instead: the policy copied into the reference once a round behind Eq. 8's guard;
  for DGPO that reference is also its DPO term's (`dgpo.reference=reference`; DGPO's default is the initial
  model), at the same beta; so it is also compared with DGPO's EMA reference in that term (`dgpo-emaref`, the
  DGPO code's use_ema_ref).
Each arm samples R x P x K images. Evaluation (run.py's stages): the hidden reward of the checkpoints at every
round boundary (reward vs images sampled and vs compute seconds: the training steps' and the rounds'
sampling wall time on one thread) and of the final models, with prompt alignment (the legibility
classifier's reading of the prompted digit), at held-out prompts and seeds. Three training seeds per arm
(`--seeds`; `--quick`: one): the intervals of the final reward and of the win rate are Student-t intervals
over the seeds. Few rounds, hyperparameters not tuned per method.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.apps.demo.online_rl_report import write_report
from xdpo.apps.demo.run import DemoSettings, Method, reward_curves, sample_and_score, stage, train_all
from xdpo.errors import ConfigError

DEFAULT_OUT = {"sd": "outputs/digits-online-rl", "flow": "outputs/digits-flow-online-rl"}
CONFIG = {"sd": "digits-dpo.yaml", "flow": "digits-flow-dpo.yaml"}
NOISY = {  # task -> the training scorer: its hidden reward + Gumbel noise
    "bold": "xdpo.apps.demo.online_rl:noisy_reward",
    "slant": "xdpo.apps.demo.online_rl:noisy_slant_reward",
}
NOISE_SCALE = 0.5  # the hidden labeller's Bradley-Terry temperature (xdpo.apps.digits.labeller)


def gumbel_noise(images: list, prompts: list[str]) -> np.ndarray:
    """Gumbel(0, 0.5) noise seeded by (image bytes, prompt): the same image always gets the same noise
    (resume and reruns stay exact)."""
    noise = []
    for im, p in zip(images, prompts, strict=True):
        digest = hashlib.sha1(np.asarray(im.convert("L")).tobytes() + p.encode()).digest()
        u = np.random.default_rng(int.from_bytes(digest[:8], "little")).random()
        noise.append(-NOISE_SCALE * np.log(-np.log(max(u, 1e-12))))
    return np.asarray(noise)


def noisy_reward(images: list, prompts: list[str]) -> np.ndarray:
    """The hidden reward (`bold` task) + `gumbel_noise`."""
    from xdpo.apps.digits.labeller import hidden_reward

    return hidden_reward(images, prompts) + gumbel_noise(images, prompts)


def noisy_slant_reward(images: list, prompts: list[str]) -> np.ndarray:
    """The `slant` task's hidden reward + `gumbel_noise` (the study's noisy task, online)."""
    from xdpo.apps.digits.tasks import slant_reward

    return slant_reward(images, prompts) + gumbel_noise(images, prompts)


KANG_DELTA = (
    500.0  # benchmarks/kang_stable.py's delta in `kang` units (calibrated on offline DPO, UNet world)
)


def kang_stable(every: int) -> tuple[str, ...]:
    """Kang et al.'s stable update: the policy copied into the reference every round (tau = E steps) behind
    their Eq. 8 guard (`kang` units; the digits configs' own guard is pred_mse)."""
    return ("reference.strategy=stable", f"reference.update_every={every}", "reference.divergence=kang",
            f"reference.max_divergence={KANG_DELTA:g}")  # fmt: skip


@dataclass
class OnlineRLSettings(DemoSettings):
    rounds: int = 4  # R
    prompts_per_round: int = 20  # P (drawn from the pool each round)
    per_prompt: int = 4  # K
    every: int = 10  # E optimizer steps per round
    sample_steps: int = 10

    @property
    def images(self) -> int:
        return self.rounds * self.prompts_per_round * self.per_prompt

    @property
    def prompts_file(self) -> Path:
        return self.out / "prompt-pool.txt"

    def arm_methods(self) -> tuple[Method, ...]:
        from xdpo.apps.digits.tasks import get_task

        config, R, P, E = CONFIG[self.family], self.rounds, self.prompts_per_round, self.every
        held = get_task(self.task).scorer
        common = ("data.path=", "online.enabled=true", f"online.prompts={self.prompts_file}",
                  f"online.per_prompt={self.per_prompt}", f"online.scorer={NOISY[self.task]}", f"online.heldout_scorer={held}",
                  f"online.sample_steps={self.sample_steps}", "online.monitor_images=8", "online.batch_images=16")  # fmt: skip
        rl = (*common, f"online.prompts_per_round={P}", f"online.every={E}", "reference.strategy=soft",
              f"reference.update_every={E}")  # fmt: skip
        # likelihood-based RL: the papers' defaults (docs/math.md), the KL's / DPO's reference the frozen base
        lk = (*common, f"online.prompts_per_round={P}", f"online.every={E}", "reference.strategy=frozen")
        return (
            Method("offline Diffusion-DPO", "offline", config,
                   (*common, f"online.prompts_per_round={R * P}", f"online.every={R * E}")),
            Method("online DPO", "online-dpo", config, (*common, f"online.prompts_per_round={P}", f"online.every={E}")),
            Method("DiffusionNFT", "nft", config, (*rl, "loss.objective=nft", "reference.soft_max=0.5")),
            Method("AWM", "awm", config, (*rl, "loss.objective=awm", "reference.soft_max=0.3")),
            Method("DGPO", "dgpo", config, (*rl, "loss.objective=dgpo", "reference.soft_max=0.3",
                                            f"train.batch_size={max(1, 16 // self.per_prompt)}")),
            # DGPO's code's use_ema_ref: its soft (EMA) reference in the DPO term too; the control of dgpo-stable
            Method("DGPO, EMA reference in its DPO term", "dgpo-emaref", config, (*rl, "loss.objective=dgpo",
                   "reference.soft_max=0.3", f"train.batch_size={max(1, 16 // self.per_prompt)}",
                   "dgpo.reference=reference")),
            Method("GRPO (Flow-GRPO)", "grpo", config, (*lk, "loss.objective=grpo")),
            Method("GRPO + MixGRPO window", "grpo-window", config,
                   (*lk, "loss.objective=grpo", "grpo.window=4", "grpo.window_every=1")),
            Method("DPOK", "dpok", config, (*lk, "loss.objective=dpok")),
            Method("D3PO", "d3po", config, (*lk, "loss.objective=d3po")),
            # Kang et al.'s stable update on the best decoupled and the best likelihood-based arm (of both worlds
            # at three seeds, docs/results/online-rl before these arms): the reference copied once a round and,
            # for DGPO, made the DPO term's reference (its default is the initial model, which would leave the
            # update only the clip's ratio to act on), at the arm's beta as Kang et al. keep DPO's
            Method("DGPO + Kang stable", "dgpo-stable", config, (*common, f"online.prompts_per_round={P}",
                   f"online.every={E}", "loss.objective=dgpo", f"train.batch_size={max(1, 16 // self.per_prompt)}",
                   "dgpo.reference=reference", *kang_stable(E))),
            Method("D3PO + Kang stable", "d3po-stable", config, (*lk, "loss.objective=d3po", *kang_stable(E))),
        )  # fmt: skip

    @classmethod
    def make_rl(
        cls,
        out: str | Path,
        *,
        quick: bool = False,
        family: str = "flow",
        seeds: int | None = None,
        arms: tuple[str, ...] = (),
        **kw: Any,
    ) -> OnlineRLSettings:
        """Full: 4 rounds of 20 prompts x 4 images, 10 steps a round (40 steps, 320 images an arm), 3 training
        seeds. Quick: 2 rounds of 8 prompts, 4 steps a round, 1 seed. `seeds`: the number of training seeds;
        `arms`: the slugs of the arms to run (default: all)."""
        if family not in CONFIG:
            raise ConfigError(f"--family: {family!r} is not one of {', '.join(CONFIG)}")
        n = seeds if seeds is not None else (1 if quick else 3)
        if n < 1:
            raise ConfigError(f"--seeds: expected a number of training seeds >= 1, got {n}")
        base: dict[str, Any] = dict(train_seeds=tuple(range(n)), eval_seeds=4, curve_seeds=2)
        if quick:
            base |= dict(quick=True, rounds=2, prompts_per_round=8, every=4, eval_seeds=1, curve_seeds=1)
        s = cls(Path(out), family=family, **{**base, **kw})
        s.max_steps, s.curve_points = s.rounds * s.every, s.rounds  # checkpoints at round boundaries
        s.methods = s.arm_methods()
        if arms:
            slugs = [m.slug for m in s.methods]
            unknown = [a for a in arms if a not in slugs]
            if unknown:
                raise ConfigError(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(slugs)})")
            s.methods = tuple(m for m in s.methods if m.slug in arms)
        return s


def write_pool(s: OnlineRLSettings) -> Path:
    from xdpo.apps.digits.data import train_prompts

    text = "\n".join(train_prompts() * 2) + "\n"
    if not s.prompts_file.is_file() or s.prompts_file.read_text() != text:
        s.prompts_file.write_text(text)
    return s.prompts_file


def seed_costs(s: OnlineRLSettings, out: Path) -> dict[str, Any]:
    """One run's cost up to each checkpoint (images sampled; compute seconds = its steps' time + the wall time of
    the rounds trained on before it) and its rounds' monitors."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [json.loads(f.read_text()) for f in sorted((out / "online").glob("round-*/round.json"))]
    points = []
    for st in range(0, s.max_steps + 1, s.every):
        made = [r for r in rounds if r["step"] < st]  # the rounds trained on before this checkpoint
        seconds = sum(r["step_time"] for r in rows if r["step"] <= st) + sum(max(r["seconds"]) for r in made)
        points.append({"step": st, "images": sum(r["images"] for r in made), "seconds": round(seconds, 2)})
    track = [[r["step"], r.get("ref_divergence"), r["ref_to_initial"], r["ref_to_policy"], r["ref_updates"],
              r["ref_frozen_step"]] for r in rows if r.get("ref_to_initial") is not None]  # fmt: skip
    return {"points": points, "reference": track, "rounds": [
        {k: r[k] for k in ("round", "step", "images", "score_mean", "images_per_second")} | r["monitors"]
        for r in rounds]}  # fmt: skip


def arm_costs(s: OnlineRLSettings, runs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """Per arm: each seed's costs (`seed_costs`) and their mean points (the images are the same for every seed;
    the seconds are averaged)."""
    costs: dict[str, Any] = {}
    for m in s.methods:
        per_seed = {seed: seed_costs(s, runs[(m.slug, seed)]) for seed in s.train_seeds}
        first = per_seed[s.train_seeds[0]]["points"]
        points = [
            {"step": p["step"], "images": p["images"],
             "seconds": round(float(np.mean([c["points"][i]["seconds"] for c in per_seed.values()])), 2)}
            for i, p in enumerate(first)
        ]  # fmt: skip
        costs[m.slug] = {"name": m.name, "points": points, "seeds": per_seed}
    return costs


def run_online_rl(
    out: str | Path,
    *,
    quick: bool = False,
    family: str = "flow",
    seeds: int | None = None,
    arms: tuple[str, ...] = (),
    settings: OnlineRLSettings | None = None,
) -> Path:
    """Run (or continue) the comparison into `out` (the arms named by slug in `arms`, default all); return the
    report path."""
    s = settings or OnlineRLSettings.make_rl(out, quick=quick, family=family, seeds=seeds, arms=arms)
    s.out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    arms = ", ".join(m.name for m in s.methods)
    with stage(f"1/4 training: {arms}, {len(s.train_seeds)} seed(s) each (rounds sampled in each)", s):
        write_pool(s)
        runs = train_all(s, s.prompts_file)
        costs = arm_costs(s, runs)
    with stage("2/4 hidden reward at every round boundary", s):
        curves = reward_curves(s, runs)
    with stage("3/4 sampling and scoring the final models", s):
        tables = sample_and_score(s, runs)
    with stage("4/4 report", s):
        s.timings["total"] = round(time.time() - t0, 1)
        load = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        report = write_report(s, costs, curves, tables, load)
    print(f"Online RL demo finished in {time.time() - t0:.0f} s. Report: {report}", flush=True)
    return report
