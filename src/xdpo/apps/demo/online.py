"""`xdpo demo --online`: on-policy rounds (online DPO) against one offline round, at equal optimizer steps.

Both arms are `online.enabled` runs of the same config (digits-dpo.yaml, or digits-flow-dpo.yaml), the same
prompts, images per prompt, sampling steps and scorer (`digits-reward`, the hidden reward: best vs worst
of K images, no label noise), the same frozen reference and the same number of optimizer steps:
- offline: one round (`online.every = max_steps`): N pairs sampled once from the base, trained on to the end;
- online: `rounds` rounds of `max_steps / rounds` steps, each on N new pairs from the current policy.
Round 0 of the two arms is the same sampling of the same base at the same seed: the online arm starts from
a copy of the offline arm's file, so they differ only after round 0. Checkpoints fall on round boundaries;
curves, final samples and scores reuse the main demo's stages (run.py), at the same seeds for every model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.apps.demo.online_report import write_online_report
from xdpo.apps.demo.run import (
    DemoSettings,
    Method,
    reward_curves,
    run_config,
    sample_and_score,
    stage,
    train_all,
)
from xdpo.errors import ConfigError, XdpoError

DEFAULT_OUT = {"sd": "outputs/digits-online", "flow": "outputs/digits-flow-online"}
CONFIG = {"sd": "digits-dpo.yaml", "flow": "digits-flow-dpo.yaml"}


@dataclass
class OnlineSettings(DemoSettings):
    rounds: int = 3  # on-policy rounds of max_steps / rounds optimizer steps
    prompt_repeats: int = 2  # each training caption this many times per round (own seeds): N = 60 x repeats
    n_prompts: int | None = None  # the first n training captions only (tests)
    per_prompt: int = 4  # images per prompt; best vs worst makes one pair
    sample_steps: int = 10  # sampling steps for the pairs (evaluation samples at the base's defaults)
    scorer: str = "digits-reward"

    @property
    def prompt_text(self) -> str:
        """The round prompts: the training captions (never the held-out evaluation ones), repeated."""
        from xdpo.apps.digits.data import train_prompts

        return "\n".join(train_prompts()[: self.n_prompts] * self.prompt_repeats) + "\n"

    @property
    def prompts_file(self) -> Path:
        """Named by its content, so that runs made with other prompts are not reused."""
        return self.out / f"prompts-{hashlib.sha1(self.prompt_text.encode()).hexdigest()[:8]}.txt"

    @property
    def every(self) -> int:
        return int(self.max_steps or 0) // self.rounds

    def arm_methods(self) -> tuple[Method, ...]:
        """The two arms: one round of `max_steps` steps, then `rounds` rounds of `every` steps."""
        config = CONFIG[self.family]
        common = (
            "data.path=",
            "online.enabled=true",
            f"online.prompts={self.prompts_file}",
            f"online.per_prompt={self.per_prompt}",
            f"online.scorer={self.scorer}",
            f"online.sample_steps={self.sample_steps}",
        )
        return (
            Method("one offline round", "offline", config, (*common, f"online.every={self.max_steps}")),
            Method(
                f"{self.rounds} on-policy rounds",
                "online",
                config,
                (*common, f"online.every={self.every}"),
            ),
        )

    @classmethod
    def make_online(
        cls, out: str | Path, *, quick: bool = False, family: str = "sd", **kw: Any
    ) -> OnlineSettings:
        """Full: 120 steps (the configs' own) in 3 rounds of 40, 120 pairs a round, 3 training seeds.
        Quick: 30 steps in 3 rounds of 10, 60 pairs a round, one seed. `kw` overrides any field."""
        if family not in CONFIG:
            raise ConfigError(f"--family: {family!r} is not one of {', '.join(CONFIG)}")
        base: dict[str, Any] = dict(max_steps=120, train_seeds=(0, 1, 2), curve_seeds=2, curve_points=6)
        if quick:
            base = dict(
                quick=True, max_steps=30, prompt_repeats=1, train_seeds=(0,), eval_seeds=2, curve_seeds=1,
                curve_points=3,
            )  # fmt: skip
        s = cls(Path(out), family=family, **{**base, **kw})
        s.methods = s.arm_methods()
        steps, every = int(s.max_steps or 0), s.every
        if s.rounds < 2 or every < 1 or steps % s.rounds:
            raise ConfigError(f"online demo: {steps} steps do not split into {s.rounds} rounds (2 or more)")
        if every % max(1, steps // s.curve_points):
            raise ConfigError(
                "online demo: checkpoints (max_steps / curve_points) must fall on round boundaries"
            )
        return s


def write_prompts(s: OnlineSettings) -> Path:
    """Write `s.prompts_file` (once)."""
    if not s.prompts_file.is_file():
        s.prompts_file.write_text(s.prompt_text)
    return s.prompts_file


def share_round0(s: OnlineSettings) -> Callable[[Method, int, Any], None]:
    """`prepare` for train_all: the online arm's round 0 is the offline arm's file (same seed, base and
    sampling settings: the same pairs by construction), so it is copied, not sampled again."""
    from xdpo.train.online import round_dir

    keys = ("prompts", "per_prompt", "scorer", "min_gap", "sample_steps")

    def prepare(m: Method, seed: int, cfg: Any) -> None:
        if m.slug != "online":
            return
        off = run_config(s, s.methods[0], seed, s.prompts_file)
        same = off.seed == cfg.seed and off.model.pretrained == cfg.model.pretrained
        if not same or any(getattr(off.online, k) != getattr(cfg.online, k) for k in keys):
            return
        src, dst = round_dir(Path(off.output_dir), 0), round_dir(Path(cfg.output_dir), 0)
        if src.is_dir() and not dst.is_dir():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)
            print(f"   round 0 of the online arm: the offline arm's pairs ({src})", flush=True)

    return prepare


def curves_once(s: OnlineSettings, runs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """reward_curves, reused when curves.json was made from the same checkpoints and settings."""
    from xdpo.train.checkpoint import list_checkpoints

    key = {
        "base": s.base,
        "curve_seeds": s.curve_seeds,
        "runs": {
            f"{slug}-s{sd}": [[st, os.path.getmtime(p)] for st, p in list_checkpoints(out)]
            for (slug, sd), out in runs.items()
        },
    }
    path, key_path = s.out / "curves.json", s.out / "curves.key.json"
    if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        print(f"   reusing {path}", flush=True)
        return json.loads(path.read_text())
    curves = reward_curves(s, runs)
    key_path.write_text(json.dumps(key))
    return curves


def arm_facts(s: OnlineSettings, runs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """Per arm and seed: optimizer steps (train_summary.json and metrics.jsonl) and each round's pairs."""
    import pyarrow.parquet as pq

    facts: dict[str, Any] = {}
    for m in s.methods:
        arm: dict[str, Any] = {"name": m.name, "steps": [], "logged_steps": [], "rounds": []}
        for seed in s.train_seeds:
            out = runs[(m.slug, seed)]
            arm["steps"].append(json.loads((out / "final" / "train_summary.json").read_text())["steps"])
            arm["logged_steps"].append(
                sum(1 for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip())
            )
            rounds = []
            for f in sorted((out / "online").glob("round-*/pairs.parquet")):
                t = pq.read_table(f, columns=["score_0", "score_1"])
                w, lo = np.asarray(t["score_0"].to_pylist()), np.asarray(t["score_1"].to_pylist())
                rounds.append({"pairs": len(w), "winner": float(w.mean()), "loser": float(lo.mean())})
            arm["rounds"].append(rounds)
        arm["images_sampled"] = len(arm["rounds"][0]) * s.prompt_text.count("\n") * s.per_prompt
        facts[m.slug] = arm
    steps = {n for a in facts.values() for n in a["steps"] + a["logged_steps"]}
    if steps != {s.max_steps}:
        raise XdpoError(
            f"online demo: the arms did not train {s.max_steps} optimizer steps each ({sorted(steps)})"
        )
    return facts


def run_online(
    out: str | Path, *, quick: bool = False, family: str = "sd", settings: OnlineSettings | None = None
) -> Path:
    """Run (or continue) the online-vs-offline comparison into `out`; return the report path."""
    s = settings or OnlineSettings.make_online(out, quick=quick, family=family)
    s.out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    with stage("1/5 round prompts (the training captions)", s):
        write_prompts(s)
    with stage(
        f"2/5 training: one offline round, then {s.rounds} on-policy rounds (pairs sampled in each)", s
    ):
        runs = train_all(s, s.prompts_file, prepare=share_round0(s))
        facts = arm_facts(s, runs)
    with stage("3/5 reward-vs-step curves", s):
        curves = curves_once(s, runs)
    with stage("4/5 sampling and scoring the final models", s):
        tables = sample_and_score(s, runs)
    with stage("5/5 report", s):
        s.timings["total"] = round(time.time() - t0, 1)
        load = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        report = write_online_report(s, facts, curves, tables, load)
    print(f"Online demo finished in {time.time() - t0:.0f} s. Report: {report}", flush=True)
    return report
