"""`xdpo study`: the stages, each resumable (rerun the same command to continue where it stopped)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from xdpo.apps.study.plan import WORLDS, StudySettings, estimate, label, main_jobs, pairs_stem, sweep_jobs
from xdpo.apps.study.runner import _init_worker, run_jobs


def _pairs(world: str, s: StudySettings, task: str = "bold", pair_set: int = 0) -> str:
    """The world's pairs for `task` and `pair_set` (out/pairs/`plan.pairs_stem`.parquet, drawn with seed
    `s.pair_seed + pair_set`), reused while their sidecar records the same count, seed, model and task."""
    from xdpo.apps.digits.pairs import make_pairs, sidecar_path
    from xdpo.evaluate.pipeline import resolve_model

    path = s.out / "pairs" / f"{pairs_stem(world, task, pair_set)}.parquet"
    seed = s.pair_seed + pair_set
    side = sidecar_path(path)
    if path.is_file() and side.is_file():
        rec = json.loads(side.read_text())
        same = rec.get("model") == str(resolve_model(WORLDS[world])) and rec.get("task", "bold") == task
        if rec.get("n_pairs") == s.n_pairs and rec.get("seed") == seed and same:
            return f"{path} (reused)"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_pairs(path, s.n_pairs, seed=seed, model=WORLDS[world], progress=False, task=task)
    return str(path)


def make_all_pairs(s: StudySettings) -> None:
    if s.workers == 1 or len(s.worlds) == 1:
        for w in s.worlds:
            print(f"   {w}: {_pairs(w, s)}", flush=True)
        return
    with ProcessPoolExecutor(s.workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        for w, path in zip(s.worlds, pool.map(_pairs, s.worlds, [s] * len(s.worlds)), strict=True):
            print(f"   {w}: {path}", flush=True)


def select(s: StudySettings, results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Each method's grid point with the highest mean hidden reward at the selection seeds (one training
    seed); writes selection.json with the whole grid."""
    chosen: dict[str, dict[str, dict]] = {w: {} for w in s.worlds}
    grid: dict[str, dict[str, list]] = {w: {} for w in s.worlds}
    for res in results.values():
        j = res["job"]
        row = {"beta": j["beta"], "lr": j["lr"], "reward": res["final"]["mean_reward"]}
        row["alignment"] = sum(res["final"]["alignment"]) / len(res["final"]["alignment"])
        row["ndelta_beyond_1_last_third"] = (res["delta"]["phases"] or [{}])[-1].get("beyond_1")
        grid[j["world"]].setdefault(j["method"], []).append(row)
    for w in s.worlds:
        for method, rows in grid[w].items():
            rows.sort(key=lambda r: (r["beta"], r["lr"]))
            best = max(rows, key=lambda r: r["reward"])
            chosen[w][method] = {"beta": best["beta"], "lr": best["lr"], "reward": best["reward"]}
    (s.out / "selection.json").write_text(json.dumps({"chosen": chosen, "grid": grid}, indent=2))
    for w in s.worlds:
        for method, c in chosen[w].items():
            print(f"   {w} {label(method, w)}: beta {c['beta']:g}, lr {c['lr']:g} (reward {c['reward']:.3f})")
    return chosen


def run_study(
    out: str | Path,
    *,
    quick: bool = False,
    worlds: str = "sd,flow",
    workers: int = 2,
    plan_only: bool = False,
) -> Path | None:
    """Run (or continue) the study into `out`; return the report path (None with `plan_only`)."""
    s = StudySettings.make(out, quick=quick, worlds=worlds, workers=workers)
    est = estimate(s)
    n_sweep = len(sweep_jobs(s))
    print(
        f"xdpo study: worlds {', '.join(s.worlds)}; {n_sweep} sweep runs, then each method at its best point and "
        f"matched beta with {len(s.seeds)} seeds{' and the Kang et al. ablation' if 'sd' in s.worlds else ''}; "
        f"{s.steps} steps each, {s.workers} worker(s).\nEstimated time on {s.workers} free core(s): "
        + ", ".join(f"{k} {v / 60:.0f} min" for k, v in est.items())
        + f". Output: {s.out} (rerun the same command to resume).",
        flush=True,
    )
    if plan_only:
        return None
    s.out.mkdir(parents=True, exist_ok=True)
    timings_path = s.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def stage(name: str, fn):
        print(f"== {name}", flush=True)
        t0 = time.time()
        value = fn()
        timings[name] = round(timings.get(name, 0.0) + time.time() - t0, 1)  # over resumed runs
        timings_path.write_text(json.dumps(timings, indent=2))
        return value

    stage("1/4 preference pairs (hidden labeller)", lambda: make_all_pairs(s))
    sweep = stage(
        "2/4 sweep: every method x (beta, lr), one seed", lambda: run_jobs(sweep_jobs(s), s, "sweep")
    )
    chosen = select(s, sweep)
    jobs = main_jobs(s, chosen)
    print(f"   {len(jobs)} main runs", flush=True)
    main = stage("3/4 main runs: chosen, matched beta, ablation", lambda: run_jobs(jobs, s, "main"))
    from xdpo.apps.study.report import write_report

    report = stage("4/4 report", lambda: write_report(s, sweep, chosen, main, timings, est))
    print(f"Study finished. Report: {report}", flush=True)
    return report
