"""`xdpo study` (second edition): the stages of `edition2`, world-task by world-task, each resumable (a
finished job is read back from its result.json; rerun the same command to continue). The report is rewritten
after every world-task, over everything finished so far."""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.apps.study import edition2 as e2
from xdpo.apps.study.hierarchy import bracket
from xdpo.apps.study.run import _pairs
from xdpo.apps.study.runner import _init_worker, run_jobs

Point = tuple[float, float]  # (beta, lr)


def make_pair_sets(s: e2.Settings, world: str, task: str) -> list[str]:
    """The world-task's pair sets (reused when their sidecars match), made in parallel."""
    n = s.pair_sets
    if s.workers == 1:
        return [_pairs(world, s, task, k) for k in range(n)]
    with ProcessPoolExecutor(
        min(s.workers, n), mp_context=get_context("spawn"), initializer=_init_worker
    ) as pool:
        return list(pool.map(_pairs, [world] * n, [s] * n, [task] * n, range(n)))


def _points(results: dict[str, dict], method: str) -> dict[Point, dict[int, dict]]:
    """(beta, lr) -> {sweep seed: result} of one method's sweep jobs."""
    out: dict[Point, dict[int, dict]] = {}
    for r in results.values():
        j = r["job"]
        if j["method"] == method:
            out.setdefault((j["beta"], j["lr"]), {})[j["seed"]] = r
    return out


def _key(p: Point, runs: dict[int, dict], seeds: tuple[int, ...]) -> tuple:
    """Sort key: the highest mean selection reward first, ties by (beta, lr) (the same on every resume)."""
    return (-float(np.mean([runs[sd]["final"]["mean_reward"] for sd in seeds if sd in runs])), p)


def winner(points: dict[Point, dict[int, dict]], seeds: tuple[int, ...]) -> Point:
    """The point with the highest mean selection reward over `seeds`, among the points run at all of them."""
    full = {p: runs for p, runs in points.items() if all(sd in runs for sd in seeds)}
    return min(full, key=lambda p: _key(p, full[p], seeds))


def _neighbours(axis: list[float], v: float, digits: str) -> list[float]:
    """v's neighbours on the sorted axis values: the next value each side, or one grid step beyond an edge."""
    if len(axis) < 2:
        return []
    i = axis.index(v)
    lo = axis[i - 1] if i > 0 else bracket(axis, v)
    hi = axis[i + 1] if i < len(axis) - 1 else bracket(axis, v)
    return [float(f"{x:{digits}}") for x in (lo, hi)]


def extensions(points: dict[Point, dict[int, dict]], best: Point) -> list[Point]:
    """The points still missing around `best`: its neighbours on the beta axis (at its lr) and on the lr axis
    (at its beta), the neighbours taken from every value run on that axis, or one geometric grid step beyond
    an edge (`hierarchy.bracket`). Empty: the winner is bracketed on both axes."""
    b, lr = best
    betas, lrs = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    new = [(x, lr) for x in _neighbours(betas, b, ".6g")] + [(b, x) for x in _neighbours(lrs, lr, ".3g")]
    return list(dict.fromkeys(p for p in new if p not in points))


def missing(points: dict[Point, dict[int, dict]], seeds: tuple[int, ...]) -> list[Point]:
    """The points still to run to bracket the current winner (`extensions` of `winner`)."""
    return extensions(points, winner(points, seeds))


def sweep(s: e2.Settings, world: str, task: str) -> tuple[dict[str, dict], dict[str, Any]]:
    """Run the world-task's sweep; return ({method: {beta, lr, reward}}, the selection record)."""
    tag = f"{world}-{task}"
    grid = e2.first_grid(s, world)
    first, rest = s.sweep_seeds[0], s.sweep_seeds[1:]
    results = run_jobs(e2.grid_jobs(s, world, task, grid, first), s, f"{tag} sweep")
    top = {}
    for m in e2.SWEPT:
        pts = _points(results, m)
        top[m] = sorted(pts, key=lambda p: _key(p, pts[p], (first,)))[: s.top_k]
    for sd in rest:
        results |= run_jobs(e2.grid_jobs(s, world, task, top, sd), s, f"{tag} sweep, seed {sd}")
    added: dict[str, list[Point]] = {m: [] for m in e2.SWEPT}
    for _ in range(s.max_extensions):
        new = {m: missing(_points(results, m), s.sweep_seeds) for m in e2.SWEPT}
        if not any(new.values()):
            break
        for m, pts in new.items():
            added[m] += pts
        jobs = [j for sd in s.sweep_seeds for j in e2.grid_jobs(s, world, task, new, sd)]
        results |= run_jobs(jobs, s, f"{tag} sweep, bracketing")
    chosen, record = {}, {"sweep_seeds": list(s.sweep_seeds), "methods": {}}
    for m in e2.SWEPT:
        pts = _points(results, m)
        best = winner(pts, s.sweep_seeds)
        rows = [_row(p, runs, s.sweep_seeds) for p, runs in sorted(pts.items())]
        edge = missing(pts, s.sweep_seeds)
        chosen[m] = {"beta": best[0], "lr": best[1], "reward": _row(best, pts[best], s.sweep_seeds)["reward"]}
        record["methods"][m] = {"chosen": chosen[m], "added": added[m], "still_on_edge": edge, "grid": rows}
    return chosen, record


def _row(p: Point, runs: dict[int, dict], seeds: tuple[int, ...]) -> dict[str, Any]:
    done = [runs[sd] for sd in seeds if sd in runs]
    return {
        "beta": p[0], "lr": p[1], "seeds": [r["job"]["seed"] for r in done],
        "rewards": [r["final"]["mean_reward"] for r in done],
        "reward": float(np.mean([r["final"]["mean_reward"] for r in done])),
        "alignment": float(np.mean([np.mean(r["final"]["alignment"]) for r in done])),
        "drift": float(np.mean([r["final"]["drift"] for r in done])),
    }  # fmt: skip


def calibration(s: e2.Settings, world: str, task: str) -> dict[str, float]:
    """Eq. 10's slope and the element count of the world's base on pair set 0 (out/calibration.json)."""
    from xdpo.apps.demo.run import CONFIGS
    from xdpo.apps.study.calibrate import measure
    from xdpo.apps.study.plan import pairs_stem

    path = s.out / "calibration.json"
    cal = json.loads(path.read_text()) if path.is_file() else {}
    key = f"{world}-{task}"
    if key not in cal:
        data = s.out / "pairs" / f"{pairs_stem(world, task, 0)}.parquet"
        cal[key] = measure(CONFIGS / e2.METHODS["xdpo"][1][world], [f"data.path={data}"])
        path.write_text(json.dumps(cal, indent=2))
    return cal[key]


def offline(s: e2.Settings, world: str, task: str, selection: dict) -> dict[str, dict]:
    """Pairs, sweep, then the main (and, on the noisy task, ablation) runs of one world-task."""
    tag = f"{world}-{task}"
    print(f"== {tag}: pairs", flush=True)
    for path in make_pair_sets(s, world, task):
        print(f"   {path}", flush=True)
    print(f"== {tag}: sweep", flush=True)
    chosen, selection[tag] = sweep(s, world, task)
    (s.out / "selection.json").write_text(json.dumps(selection, indent=2))
    for m, c in chosen.items():
        print(f"   {e2.label(m, world)}: beta {c['beta']:g}, lr {c['lr']:g} (selection {c['reward']:.3f})")
    jobs = e2.main_jobs(s, world, task, chosen)
    if task == e2.NOISY_TASK:
        jobs += e2.ablation_jobs(s, world, task, chosen, calibration(s, world, task))
    print(f"== {tag}: {len(jobs)} main and ablation runs", flush=True)
    return run_jobs(jobs, s, f"{tag} main")


def online(s: e2.Settings, world: str) -> dict[str, Any]:
    """The online arms of `xdpo demo --online-rl` on the noisy task (equal sampled images; its own report in
    out/online/<world>); returns its results.json."""
    from xdpo.apps.demo.online_rl import OnlineRLSettings, run_online_rl

    print(f"== {world}-{e2.NOISY_TASK}: online arms", flush=True)
    o = OnlineRLSettings.make_rl(
        s.out / "online" / world, quick=s.quick, family=world, seeds=s.online_seeds, task=e2.NOISY_TASK
    )
    run_online_rl(o.out, settings=o)
    return json.loads((o.out / "results.json").read_text())


def finished(s: e2.Settings, selection: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """(main and ablation results, online results per world) of every job already finished in s.out, for the
    world-tasks whose sweep has chosen (nothing is trained)."""
    from xdpo.apps.study.runner import same_images

    cal_path = s.out / "calibration.json"
    cal = json.loads(cal_path.read_text()) if cal_path.is_file() else {}
    results: dict[str, dict] = {}
    for w, t in s.world_tasks():
        rec = selection.get(f"{w}-{t}")
        if not rec:
            continue
        chosen = {m: r["chosen"] for m, r in rec["methods"].items()}
        jobs = e2.main_jobs(s, w, t, chosen)
        if t == e2.NOISY_TASK and f"{w}-{t}" in cal:
            jobs += e2.ablation_jobs(s, w, t, chosen, cal[f"{w}-{t}"])
        for j in jobs:
            path = s.out / "runs" / j.name / "result.json"
            r = json.loads(path.read_text()) if path.is_file() else None
            if r is not None and r.get("job") == j.as_dict() and same_images(r, j, s):
                results[j.name] = r
    online = {w: json.loads((s.out / "online" / w / "results.json").read_text()) for w in s.worlds
              if (s.out / "online" / w / "results.json").is_file()}  # fmt: skip
    return results, online


def run_study2(
    out: str | Path, *, quick: bool = False, worlds: str | None = None, tasks: str | None = None,
    workers: int = 2, plan_only: bool = False, report_only: bool = False,
) -> Path | None:  # fmt: skip
    """Run (or continue) the second edition into `out`; return the report path (None with `plan_only`).
    `report_only`: rewrite the report from the runs finished so far, training nothing."""
    from xdpo.apps.study.report2 import write_report

    s = e2.Settings.make2(out, quick=quick, worlds=worlds, tasks=tasks, workers=workers)
    est = e2.estimate(s)
    print(
        f"xdpo study (second edition): {', '.join(' '.join(x) for x in e2.stages(s))}; {s.steps} steps a run, "
        f"{len(s.seeds)} seeds x {s.pair_sets} pair sets an arm, {s.workers} worker(s).\nEstimated time on "
        f"{s.workers} free core(s): " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in est.items())
        + f" (more if a sweep grows to bracket its winner). Output: {s.out} (rerun the same command to resume).",
        flush=True,
    )  # fmt: skip
    if plan_only:
        return None
    s.out.mkdir(parents=True, exist_ok=True)
    timings_path, selection_path = s.out / "timings.json", s.out / "selection.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else {}
    if report_only:
        done, online_done = finished(s, selection)
        report = write_report(s, done, selection, timings, online_done)
        print(f"Report of the runs finished so far: {report}", flush=True)
        return report
    results: dict[str, dict] = {}
    online_results: dict[str, dict] = {}
    report = None
    for kind, w, t in e2.stages(s):
        t0 = time.time()
        if kind == "online":
            online_results[w] = online(s, w)
        else:
            results |= offline(s, w, t, selection)
        tag = f"{w}-{t} {kind}"
        timings[tag] = round(timings.get(tag, 0.0) + time.time() - t0, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
        report = write_report(s, results, selection, timings, online_results)
        print(f"   report: {report}", flush=True)
    print(f"Study finished. Report: {report}", flush=True)
    return report
