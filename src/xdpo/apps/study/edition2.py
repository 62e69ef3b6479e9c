"""The second edition of `xdpo study`: what it runs, in which order, and what it costs.

Per world (the UNet base `sd`, the flow base `flow`) and task (`slant`, labelled with noise, first; then
`bold`, the first edition's), in that order, so that a run cut short has answered the noisy task first:
1. pairs   - `pair_sets` pair sets from the base (seeds pair_seed + k), labelled by the task's labeller;
2. sweep   - Diffusion-DPO (Flow-DPO) and xDPO (Appendix C) over 4 betas x 3 learning rates at the first
             sweep seed; the second sweep seed at each method's `top_k` points; the winner is the best mean
             of both seeds over the selection images (20 prompts x `select_seeds`); while it sits on an edge of
             its beta or lr axis, the axis grows by one grid step (`hierarchy.bracket`) at the winner's other
             value, up to `max_extensions` times;
3. main    - both at their winners and Diffusion-DPO at xDPO's effective beta (beta_xDPO x 1.05, xDPO's lr:
             the paper ran xDPO at 1000 against DPO's 5000), `seeds` training seeds x `pair_sets` pair sets,
             with reward-vs-step curves;
4. ablation (noisy task) - xDPO's Table 3 (eta, n) rows, Eq. 10 and the summed error (mean vs sum) at
             Diffusion-DPO's effective beta (`calibrate`), and Kang et al.'s stable update (behind their Eq. 8
             guard) with and without the mean-normalised timestep weight, at Diffusion-DPO's winner, `seeds`
             seeds on pair set 0 (paired with the main stage's Diffusion-DPO runs there).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdpo.apps.study.calibrate import TABLE3, appendix_c_slope
from xdpo.apps.study.plan import METHODS, Job, StudySettings
from xdpo.errors import ConfigError

TASKS = ("slant", "bold")  # the noisy task first
NOISY_TASK = "slant"
SWEPT = ("dpo", "xdpo")
BETAS = {
    "sd": (10.0, 30.0, 100.0, 300.0),
    "flow": (1.0, 3.0, 10.0, 30.0),
}  # around the first edition's winners
LRS = (1e-5, 3e-5, 1e-4)
SWEEP_SEEDS = (100, 101)
# Kang et al.'s stable update: tau 16, their Eq. 8 guard in `kang` units at the delta calibrated per world on the
# unguarded run (benchmarks/kang_stable.py: 500 UNet, 1000 flow); timestep-aware with the mean-normalised weight
TAU = 16
KANG_DELTA = {"sd": 500.0, "flow": 1000.0}
# seconds on one core (one thread) per training step, sampled image, job and labelled pair, fitted to this
# edition's run on these CPUs (2 workers on 2 cores: UNet main jobs 50 s, ablation 39 s, sweep 64 s)
COST = {
    "sd": {"step": 0.18, "image": 0.05, "job": 6.0, "pair": 0.16},
    "flow": {"step": 0.20, "image": 0.06, "job": 7.0, "pair": 0.18},
}
ONLINE_S = 1600.0 * 12 / 9  # seconds per world of the 12 online arms at 3 seeds, 2 cores
TS_NORM = ("timesteps.sampling=skewed", "timesteps.weighting=snr", "timesteps.normalize=true")


def kang_arms(world: str) -> dict[str, tuple[str, ...]]:
    stable = ("reference.strategy=stable", f"reference.update_every={TAU}", "reference.divergence=kang",
              f"reference.max_divergence={KANG_DELTA[world]:g}")  # fmt: skip
    return {"kang-stable": stable, "kang-both": stable + TS_NORM}


def table3_key(eta: float, n: float) -> str:
    return f"t3-eta{eta:g}-n{n:g}"


LABELS = {
    "dpo": "{baseline}",
    "xdpo": "xDPO (Appendix C)",
    "dpo-at-xdpo": "{baseline} at xDPO's effective beta",
    **{table3_key(e, n): f"xDPO eta {e:g}, n {n:g}, gamma 1/{n:g}, matched beta" for e, n in TABLE3},
    "eq10": "xDPO Eq. 10, matched beta",
    "sum": "xDPO, summed error, matched beta",
    "kang-stable": "{baseline} + stable reference update",
    "kang-both": "{baseline} + stable update + timestep-aware (normalised)",
}
BASELINE = {"sd": "Diffusion-DPO", "flow": "Flow-DPO"}


def label(method: str, world: str) -> str:
    return LABELS[method].format(baseline=BASELINE[world])


@dataclass
class Settings(StudySettings):
    tasks: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    pair_sets: int = 3
    sweep_seeds: tuple[int, ...] = SWEEP_SEEDS
    top_k: int = 3
    max_extensions: int = 3
    betas: dict | None = None
    lrs: tuple[float, ...] = LRS
    curve_seeds: int = 2  # 40 images per checkpoint
    eval_seeds: int = 5  # 100 images per final model
    select_seeds: int = 10  # 200 selection images
    ablation_seeds: int = 5  # the first of `seeds` the ablation arms run at (pair set 0)
    online_seeds: int = 3  # training seeds of each online arm (`xdpo demo --online-rl`'s default)

    @classmethod
    def make2(
        cls,
        out,
        *,
        quick: bool = False,
        worlds: str | None = None,
        tasks: str | None = None,
        workers: int = 2,
    ) -> Settings:
        """The full study, or with `quick` a smoke run of every stage at a tiny scale (the UNet world's noisy
        task unless `worlds` / `tasks` say otherwise: ~5 min on 2 cores)."""
        worlds = worlds or ("sd" if quick else "sd,flow")
        tasks = tasks or (NOISY_TASK if quick else ",".join(TASKS))
        base = StudySettings.make(out, worlds=worlds, workers=workers)
        ts = tuple(t.strip() for t in tasks.split(",") if t.strip())
        bad = [t for t in ts if t not in TASKS]
        if bad or not ts:
            raise ConfigError(f"--tasks: {','.join(bad) or tasks!r}: expected a list of {', '.join(TASKS)}")
        s = cls(base.out, worlds=base.worlds, workers=workers, tasks=ts, steps=200, n_pairs=1000)
        if quick:  # every stage on a small scale: 2 x 2 grid, 1 sweep seed, 2 seeds x 2 pair sets, 16 steps
            small = {"steps": 16, "n_pairs": 96, "curve_points": 2, "curve_seeds": 1, "eval_seeds": 1,
                     "select_seeds": 1, "seeds": (0, 1), "pair_sets": 2, "sweep_seeds": (100,), "top_k": 1,
                     "max_extensions": 0, "quick": True, "online_seeds": 1, "ablation_seeds": 1, "lrs": (3e-5, 1e-4),
                     "betas": {"sd": (30.0, 100.0), "flow": (3.0, 10.0)}}  # fmt: skip
            for key, value in small.items():
                setattr(s, key, value)
        return s

    def beta_grid(self, world: str) -> tuple[float, ...]:
        return (self.betas or BETAS)[world]

    def world_tasks(self) -> list[tuple[str, str]]:
        return [(w, t) for t in self.tasks for w in self.worlds]


def stages(s: Settings) -> list[tuple[str, str, str]]:
    """(kind, world, task) in run order: the noisy task offline in every world, its online arms, the rest."""
    noisy = [("offline", w, t) for w, t in s.world_tasks() if t == NOISY_TASK]
    rest = [("offline", w, t) for w, t in s.world_tasks() if t != NOISY_TASK]
    return noisy + [("online", w, NOISY_TASK) for w in s.worlds if NOISY_TASK in s.tasks] + rest


# arm -> the method whose digits config it runs (plan.METHODS), its overrides on top
CONFIG_OF = {"dpo": "dpo", "xdpo": "xdpo", "dpo-at-xdpo": "dpo", "eq10": "xdpo", "sum": "xdpo",
             "kang-stable": "dpo", "kang-both": "dpo", **{table3_key(e, n): "xdpo" for e, n in TABLE3}}  # fmt: skip


def job(s: Settings, world: str, task: str, stage: str, method: str, beta: float, lr: float, seed: int,
        pair_set: int = 0, overrides: tuple[str, ...] = ()) -> Job:  # fmt: skip
    config = METHODS[CONFIG_OF[method]][1][world]
    curve = s.curve_points if stage == "main" else 0  # curves: steps-to-reach of the main arms
    beta = float(f"{beta:.6g}")
    return Job(world, stage, method, config, beta, lr, seed, s.steps, curve, overrides, task, pair_set)


def grid_jobs(s: Settings, world: str, task: str, points: dict[str, list[tuple[float, float]]], seed: int):
    return [job(s, world, task, "sweep", m, b, lr, seed) for m, pts in points.items() for b, lr in pts]


def first_grid(s: Settings, world: str) -> dict[str, list[tuple[float, float]]]:
    return {m: [(b, lr) for b in s.beta_grid(world) for lr in s.lrs] for m in SWEPT}


def main_jobs(s: Settings, world: str, task: str, chosen: dict[str, dict]) -> list[Job]:
    """dpo and xdpo at their winners, dpo at xDPO's effective beta: seeds x pair sets each."""
    d, x = chosen["dpo"], chosen["xdpo"]
    arms = {"dpo": (d["beta"], d["lr"]), "xdpo": (x["beta"], x["lr"])}
    arms["dpo-at-xdpo"] = (x["beta"] * appendix_c_slope(0.05, 6.0), x["lr"])
    return [  # leaf by leaf (pair set, seed), every arm: a run cut short still compares paired
        job(s, world, task, "main", m, b, lr, sd, p)
        for p in range(s.pair_sets)
        for sd in s.seeds
        for m, (b, lr) in arms.items()
    ]


def ablation_jobs(
    s: Settings, world: str, task: str, chosen: dict[str, dict], cal: dict[str, float]
) -> list[Job]:
    """At Diffusion-DPO's winner (beta_D, lr): Table 3 at beta_D / (eta + 1), Eq. 10 at beta_D / its measured
    slope, the summed error at beta_D / (1.05 D), Kang's arms at beta_D; pair set 0, `seeds` seeds."""
    b, lr = chosen["dpo"]["beta"], chosen["dpo"]["lr"]
    arms: dict[str, tuple[float, tuple[str, ...]]] = {}
    for eta, n in TABLE3:
        arms[table3_key(eta, n)] = (b / appendix_c_slope(eta, n), (f"loss.eta={eta:g}", f"loss.n={n:g}",
                                                                   f"loss.gamma={1 / n!r}"))  # fmt: skip
    arms["eq10"] = (b / cal["eq10_slope"], ("loss.divergence=xdpo_eq10",))
    arms["sum"] = (b / (appendix_c_slope(0.05, 6.0) * cal["elements"]), ("loss.error_reduction=sum",))
    for key, over in kang_arms(world).items():
        arms[key] = (b, over)
    return [job(s, world, task, "ablation", m, beta, lr, sd, 0, over) for sd in s.seeds[: s.ablation_seeds]
            for m, (beta, over) in arms.items()]  # fmt: skip


def job_cost(s: Settings, j: Job) -> float:
    c = COST[j.world]
    images = 20 * (s.select_seeds if j.stage == "sweep" else s.eval_seeds)
    images += 20 * s.curve_seeds * (j.curve_points + 1) if j.curve_points else 0
    return c["job"] + c["step"] * j.steps + c["image"] * images


def estimate(s: Settings) -> dict[str, float]:
    """Seconds per stage on `s.workers` cores: the sweep without extensions, the chosen points at grid values."""
    out = {"pairs": 0.0, "sweep": 0.0, "main": 0.0, "ablation": 0.0}
    cal = {"eq10_slope": 1.0, "elements": 1}
    for w, t in s.world_tasks():
        out["pairs"] += COST[w]["pair"] * s.n_pairs * s.pair_sets
        grid = first_grid(s, w)
        jobs = grid_jobs(s, w, t, grid, s.sweep_seeds[0])
        for seed in s.sweep_seeds[1:]:
            jobs += grid_jobs(s, w, t, {m: pts[: s.top_k] for m, pts in grid.items()}, seed)
        out["sweep"] += sum(job_cost(s, j) for j in jobs)
        chosen = {m: {"beta": s.beta_grid(w)[-1], "lr": s.lrs[-1]} for m in SWEPT}
        out["main"] += sum(job_cost(s, j) for j in main_jobs(s, w, t, chosen))
        if t == NOISY_TASK:
            out["ablation"] += sum(job_cost(s, j) for j in ablation_jobs(s, w, t, chosen, cal))
    out = {k: v / s.workers for k, v in out.items()}
    if (
        NOISY_TASK in s.tasks
    ):  # ONLINE_S: measured in docs/results/online-rl (1600 s a world, 9 arms x 3 seeds)
        out["online"] = len(s.worlds) * ONLINE_S * s.online_seeds / 3 * (0.1 if s.quick else 1.0)
    out["total"] = sum(out.values())
    return out
