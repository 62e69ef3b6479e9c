"""What `xdpo study` runs: the jobs of each stage, the sweep grids, and a time estimate.

Stages (each resumable; a finished job is read back from its result.json):
1. pairs   - preference pairs from each digits base, labelled by the hidden labeller;
2. sweep   - every method x (beta, lr) grid point, one training seed, scored at selection seeds;
3. main    - every method at its own best grid point, and xDPO's Appendix C form matched to Diffusion-DPO's
             initial effective beta (beta / 1.05), each with `seeds` training seeds; the Kang et al. ablation
             (UNet base);
4. report  - curves, win rates, steps-to-reach, delta histograms, plain answers (report.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from xdpo.errors import ConfigError

WORLDS = {"sd": "digits", "flow": "digits-flow"}  # world -> named base model
# the xDPO transform's slope at delta = 0 (both forms): eta + gamma * n = 0.05 + 1/6 * 6 (docs/math.md §2)
XDPO_SLOPE_AT_0 = 1.05
N_XDPO = 6.0  # xDPO's n: the report shows n * delta, where the transform departs from DPO's

# method key -> (label, config file per world); a world without the config does not run the method
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "dpo": ("Diffusion-DPO", {"sd": "digits-dpo.yaml", "flow": "digits-flow-dpo.yaml"}),
    "xdpo": ("xDPO (Appendix C)", {"sd": "digits-xdpo.yaml", "flow": "digits-flow-xdpo.yaml"}),
    "xdpo-eq9": ("xDPO (Eq. 9)", {"sd": "digits-xdpo-eq9.yaml", "flow": "digits-flow-xdpo-eq9.yaml"}),
    "sft": ("SFT", {"sd": "digits-sft.yaml", "flow": "digits-flow-sft.yaml"}),
    "kto": ("Diffusion-KTO", {"sd": "digits-kto.yaml"}),
}
BASELINE = {"sd": "Diffusion-DPO", "flow": "Flow-DPO"}  # the dpo method's name per world

# the sweep: the same budget (2 betas x 2 learning rates) for every beta-using method of a world; SFT has
# no beta and gets the 2 learning rates. The points span the digits configs' own sweeps (their comments):
# a 10x range of beta, and the lr that kept prompt alignment (3e-5) against one 3x higher.
LRS = (3e-5, 1e-4)
BETAS = {"sd": (30.0, 300.0), "flow": (1.0, 10.0)}
KTO_BETAS = (300.0, 3000.0)  # KTO's per-image sigmoid saturates later: its own range, same budget
SFT_LRS = LRS

# Kang et al. 2025 (Tables 3-4), on top of Diffusion-DPO's chosen (beta, lr), UNet base
REF_UPDATE = ("reference.strategy=stable",)  # the copy behind the configs' pred_mse guard
TIMESTEP_AWARE = ("timesteps.sampling=skewed", "timesteps.weighting=snr")
NO_GUARD = ("reference.strategy=stable", "reference.update_every=4", "reference.max_divergence=1e9")
# the digits configs' guard (tau 32, delta 0.1) was set at beta 300; at the sweep's beta 30 the policy moves
# faster and the guard freezes the reference after <= 1 update, so the update is also run where it operates
REF_LOOSE = ("reference.strategy=stable", "reference.update_every=16", "reference.max_divergence=0.5")
ABLATION = {  # key -> (label, overrides, steps factor)
    "dpo-ref": ("+ reference update", REF_UPDATE, 1),
    "dpo-ts": ("+ timestep-aware", TIMESTEP_AWARE, 1),
    "dpo-both": ("+ both", REF_UPDATE + TIMESTEP_AWARE, 1),
    "dpo-ref16": ("+ reference update, tau 16, delta 0.5", REF_LOOSE, 1),
    "dpo-both16": ("+ both, tau 16, delta 0.5", REF_LOOSE + TIMESTEP_AWARE, 1),
    "dpo-tau4": ("+ reference update, tau 4, no guard (2x steps)", NO_GUARD, 2),
}


@dataclass(frozen=True)
class Job:
    """One training run and its evaluation; `name` is its folder under out/runs/."""

    world: str
    stage: str  # sweep | main
    method: str  # METHODS or ABLATION key, or `xdpo-matched` / `xdpo-eq9-matched`
    config: str
    beta: float
    lr: float
    seed: int
    steps: int
    curve_points: int  # checkpoints evaluated for the reward-vs-step curve (0: the final model only)
    overrides: tuple[str, ...] = ()
    task: str = "bold"  # the preference (xdpo.apps.digits.tasks): its pairs, and its reward at evaluation
    pair_set: int = 0  # which pair set (pairs drawn with seed StudySettings.pair_seed + pair_set)

    @property
    def name(self) -> str:
        p = f"-p{self.pair_set}" if self.pair_set else ""
        return f"{self.world_task}/{self.stage}/{self.method}-b{self.beta:g}-lr{self.lr:g}-s{self.seed}{p}"

    @property
    def world_task(self) -> str:
        """`sd`, `flow` for the first task; `sd-slant`, ... for another."""
        return self.world if self.task == "bold" else f"{self.world}-{self.task}"

    @property
    def pairs_stem(self) -> str:
        """The stem of its pairs file under out/pairs: `sd`, `sd-slant`, `sd-slant-p1`, ..."""
        return pairs_stem(self.world, self.task, self.pair_set)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["overrides"] = list(self.overrides)
        for key, first in (
            ("task", "bold"),
            ("pair_set", 0),
        ):  # the first edition's records read back as before
            if d[key] == first:
                del d[key]
        return d


def pairs_stem(world: str, task: str = "bold", pair_set: int = 0) -> str:
    """out/pairs/<stem>.parquet of a world, task and pair set."""
    return world + ("" if task == "bold" else f"-{task}") + (f"-p{pair_set}" if pair_set else "")


@dataclass
class StudySettings:
    out: Path
    worlds: tuple[str, ...] = ("sd", "flow")
    steps: int = 200  # optimizer steps of 16 pairs per run
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of the main and ablation runs
    sweep_seed: int = 100  # the sweep's training seed: apart from the main runs' seeds
    n_pairs: int = 1000
    pair_seed: int = 0
    curve_points: int = 5
    curve_seeds: int = 1  # seeds per held-out prompt for the curves (20 prompts)
    eval_seeds: int = 5  # seeds per held-out prompt for the final models (first seed 1000)
    select_seeds: int = 2  # seeds per held-out prompt to pick the sweep's best (first seed 2000: apart)
    workers: int = 2
    quick: bool = False
    grids: dict = field(default_factory=dict)  # overrides of the module grids (quick)

    @classmethod
    def make(cls, out: str | Path, *, quick: bool = False, worlds: str = "sd,flow", workers: int = 2):
        ws = tuple(w.strip() for w in worlds.split(",") if w.strip())
        bad = [w for w in ws if w not in WORLDS]
        if bad or not ws:
            raise ConfigError(
                f"--worlds: {','.join(bad) or worlds!r}: expected a list of {', '.join(WORLDS)}"
            )
        if workers < 1:
            raise ConfigError(f"--workers: {workers}: expected at least 1")
        if quick:  # a smoke run of every stage: tiny grids, 2 seeds, few steps
            grids = {"lrs": (3e-5,), "sft_lrs": (3e-5,), "kto_betas": (300.0,)}
            grids["betas"] = {"sd": (100.0, 300.0), "flow": (3.0, 10.0)}
            return cls(
                Path(out), worlds=ws, steps=16, seeds=(0, 1), n_pairs=96, curve_points=2, curve_seeds=1,
                eval_seeds=2, select_seeds=1, workers=workers, quick=True, grids=grids,
            )  # fmt: skip
        return cls(Path(out), worlds=ws, workers=workers)

    def grid(self, key: str, world: str | None = None):
        default = {"lrs": LRS, "sft_lrs": SFT_LRS, "kto_betas": KTO_BETAS, "betas": BETAS}[key]
        value = self.grids.get(key, default)
        return value[world] if world is not None else value


def config_of(method: str, world: str) -> str | None:
    return METHODS[method][1].get(world)


def sweep_jobs(s: StudySettings) -> list[Job]:
    jobs = []
    for w in s.worlds:
        for method in METHODS:
            config = config_of(method, w)
            if config is None:
                continue
            if method == "sft":
                points = [(s.grid("betas", w)[-1], lr) for lr in s.grid("sft_lrs")]  # beta unused by SFT
            else:
                betas = s.grid("kto_betas") if method == "kto" else s.grid("betas", w)
                points = [(b, lr) for b in betas for lr in s.grid("lrs")]
            jobs += [Job(w, "sweep", method, config, b, lr, s.sweep_seed, s.steps, 0) for b, lr in points]
    return jobs


def main_jobs(s: StudySettings, chosen: dict[str, dict[str, dict]]) -> list[Job]:
    """Every method at its chosen point; xDPO (Appendix C) at Diffusion-DPO's initial effective beta
    (beta_DPO / 1.05, DPO's lr); the ablation on the UNet base. `chosen[world][method] = {beta, lr}`."""
    jobs = []
    for w in s.worlds:
        c = chosen[w]
        for method in METHODS:
            if config_of(method, w) is None:
                continue
            jobs += [
                Job(w, "main", method, config_of(method, w), c[method]["beta"], c[method]["lr"], sd, s.steps,
                    s.curve_points)
                for sd in s.seeds
            ]  # fmt: skip
        dpo = c["dpo"]
        for method in ("xdpo",):  # Appendix C: the form the paper reported with (docs/math.md §2)
            beta = float(f"{dpo['beta'] / XDPO_SLOPE_AT_0:.6g}")
            jobs += [
                Job(w, "main", f"{method}-matched", config_of(method, w), beta, dpo["lr"], sd, s.steps,
                    s.curve_points)
                for sd in s.seeds
            ]  # fmt: skip
        if w == "sd":
            for key, (_, overrides, factor) in ABLATION.items():
                jobs += [
                    Job(w, "main", key, config_of("dpo", w), dpo["beta"], dpo["lr"], sd, s.steps * factor,
                        s.curve_points * factor, overrides)
                    for sd in s.seeds
                ]  # fmt: skip
    return jobs


def label(method: str, world: str) -> str:
    """The report's row label of a method key."""
    if method in ABLATION:
        return ABLATION[method][0]
    if method.endswith("-matched"):
        return METHODS[method.removesuffix("-matched")][0] + ", matched beta"
    name = METHODS[method][0]
    return BASELINE[world] if method == "dpo" else name


# seconds on one core (1 thread), fitted to the full study's run on these CPUs (2 workers, 2 cores, partly
# shared): per training step, per sampled image, per pair, per job (loading, checkpoints, final model)
COST = {
    "sd": {"step": 0.27, "image": 0.12, "pair": 0.3, "job": 30.0},
    "flow": {"step": 0.30, "image": 0.14, "pair": 0.3, "job": 35.0},
}


def job_cost(s: StudySettings, job: Job) -> float:
    c = COST[job.world]
    images = 20 * (s.select_seeds if job.stage == "sweep" else s.eval_seeds)
    images += 20 * s.curve_seeds * (job.curve_points + 1)
    return c["job"] + c["step"] * job.steps + c["image"] * images


def estimate(s: StudySettings, n_main_per_world: dict[str, int] | None = None) -> dict[str, float]:
    """Seconds per stage on `s.workers` cores (the main stage sized with the sweep's grid)."""
    pairs = sum(COST[w]["pair"] * s.n_pairs for w in s.worlds) / min(s.workers, len(s.worlds))
    sweep = sum(job_cost(s, j) for j in sweep_jobs(s)) / s.workers
    chosen = {
        w: {m: {"beta": s.grid("betas", w)[0], "lr": s.grid("lrs")[0]} for m in METHODS} for w in s.worlds
    }
    main = sum(job_cost(s, j) for j in main_jobs(s, chosen)) / s.workers
    return {"pairs": pairs, "sweep": sweep, "main": main, "total": pairs + sweep + main}
