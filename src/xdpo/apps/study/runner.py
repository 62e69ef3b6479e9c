"""Run a study job: train (resuming an interrupted run), evaluate at fixed seeds, summarise delta, clean up.

A job's folder keeps config.yaml, metrics.jsonl (with every image's delta) and result.json; its
checkpoints and final model are deleted once evaluated (a full study would otherwise hold ~10 GB).
Jobs run in a pool of single-thread worker processes (2 cores: 2 workers).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.apps.study.plan import N_XDPO, WORLDS, Job, StudySettings
from xdpo.errors import XdpoError

# n * delta histogram bins (n = 6): where xDPO's slope eta + exp(n delta) departs from 1.05
NDELTA_BINS = np.concatenate([[-np.inf], np.linspace(-4.0, 4.0, 33), [np.inf]])
PHASES = 3  # the histograms split each run's steps into thirds
_EVALUATORS: dict[tuple, Any] = {}  # per worker process: loaded once


def evaluator(world: str, n_seeds: int, first_seed: int):
    from xdpo.apps.demo.run import SameSeedEvaluator

    key = (world, n_seeds, first_seed)
    if key not in _EVALUATORS:
        ev = SameSeedEvaluator(n_seeds, WORLDS[world], first_seed=first_seed)
        ev.base_images = ev.images()
        ev.base_pixels = _pixels(ev.base_images)  # drift compares every job's images with these
        _EVALUATORS[key] = ev
    return _EVALUATORS[key]


def _pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])


def image_stats(ev, images: list, task: str = "bold") -> dict[str, Any]:
    """Per-image hidden reward of the task and alignment (in the evaluator's (seed, prompt) order), drift
    from the base's same-seed image and diversity (mean RMS distance between a prompt's images at different
    seeds)."""
    from xdpo.apps.digits.labeller import alignment
    from xdpo.apps.digits.tasks import get_task

    px = _pixels(images)
    drift = float(np.sqrt(((px - ev.base_pixels) ** 2).mean(axis=(1, 2))).mean())
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(ev.prompts):
        by_prompt.setdefault(p, []).append(i)
    dists = [
        float(np.sqrt(((px[a] - px[b]) ** 2).mean()))
        for idx in by_prompt.values()
        for k, a in enumerate(idx)
        for b in idx[k + 1 :]
    ]
    return {
        "reward": [round(float(x), 5) for x in get_task(task).reward(images, ev.prompts)],
        "alignment": [round(float(x), 4) for x in alignment(images, ev.prompts)],
        "drift": drift,
        "diversity": float(np.mean(dists)) if dists else float("nan"),
    }


def delta_summary(metrics: list[dict], steps: int) -> dict[str, Any]:
    """Histograms of n * delta per third of training, per-step quantiles, and the share with |n delta| > 1."""
    rows = [m for m in metrics if "deltas" in m and m["deltas"]]
    out: dict[str, Any] = {"bins": [float(b) for b in NDELTA_BINS[1:-1]], "phases": [], "per_step": []}
    if not rows or not np.isfinite(rows[0]["deltas"]).all():
        return out
    for k in range(PHASES):
        lo, hi = k * steps / PHASES, (k + 1) * steps / PHASES
        nd = N_XDPO * np.concatenate([m["deltas"] for m in rows if lo < m["step"] <= hi] or [[np.nan]])
        nd = nd[np.isfinite(nd)]
        counts, _ = np.histogram(nd, NDELTA_BINS)
        out["phases"].append(
            {
                "steps": [int(lo) + 1, int(hi)],
                "counts": counts.tolist(),
                "quantiles": np.quantile(nd, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist() if nd.size else [],
                "beyond_1": float((np.abs(nd) > 1).mean()) if nd.size else float("nan"),
                "beyond_3": float((np.abs(nd) > 3).mean()) if nd.size else float("nan"),
            }
        )
    for m in rows:
        d = np.asarray(m["deltas"])
        out["per_step"].append([m["step"], *np.quantile(N_XDPO * d, [0.05, 0.5, 0.95]).round(4).tolist()])
    return out


def train_job(job: Job, s: StudySettings, folder: Path):
    """Train (or resume) the job's run in `folder`; return its config."""
    from xdpo.apps.demo.run import CONFIGS, _same_config
    from xdpo.config import load_config
    from xdpo.train.checkpoint import list_checkpoints
    from xdpo.train.recipe import train

    every = job.steps // job.curve_points if job.curve_points else 0
    over = [
        f"data.path={s.out / 'pairs' / f'{job.pairs_stem}.parquet'}",
        f"seed={job.seed}",
        f"loss.beta={job.beta}",
        f"train.learning_rate={job.lr}",
        f"train.max_steps={job.steps}",
        f"train.checkpoint_every={every}",
        "train.checkpoints_keep=0",
        "train.log_deltas=true",
        f"output_dir={folder}",
        *job.overrides,
    ]
    cfg = load_config(CONFIGS / job.config, over)
    if (folder / "final" / "train_summary.json").is_file() and _same_config(folder, cfg):
        return cfg
    if (folder / "config.yaml").is_file() and not _same_config(folder, cfg):
        for sub in ("checkpoints", "final"):  # another plan's run: start again (train.log is kept)
            shutil.rmtree(folder / sub, ignore_errors=True)
        for name in ("metrics.jsonl", "config.yaml"):
            (folder / name).unlink(missing_ok=True)
    if list_checkpoints(folder):
        cfg.train.resume_from = "latest"
    train(cfg)
    return cfg


def same_images(result: dict[str, Any], job: Job, s: StudySettings) -> bool:
    """Whether a finished result was evaluated on as many images as `s` asks of this job now (another
    edition's or another setting's result of the same job record is not reused)."""
    from xdpo.apps.digits.data import eval_prompts

    n = len(eval_prompts())
    final = n * (s.select_seeds if job.stage == "sweep" else s.eval_seeds)
    if len(result.get("final", {}).get("reward", [])) != final:
        return False
    curves = result.get("curve_rewards")
    return not job.curve_points or curves is None or len(curves[0]) == n * s.curve_seeds


def run_job(job: Job, s: StudySettings) -> dict[str, Any]:
    """Train and evaluate one job (reusing its result.json when it matches the job); return the result."""
    from xdpo.models.denoiser import load_denoiser
    from xdpo.train.checkpoint import list_checkpoints
    from xdpo.train.metrics import read_metrics

    folder = s.out / "runs" / job.name
    result_path = folder / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("job") == job.as_dict() and same_images(result, job, s):
            return result
    t0 = time.time()
    train_job(job, s, folder)
    train_s = time.time() - t0
    metrics = read_metrics(folder / "metrics.jsonl")
    result: dict[str, Any] = {"job": job.as_dict(), "train_s": round(train_s, 1)}
    if job.curve_points:
        ev = evaluator(job.world, s.curve_seeds, 1000)
        base = image_stats(ev, ev.base_images, job.task)["reward"]
        curve, per_image = [(0, float(np.mean(base)))], [base]  # per image: the hierarchical bootstrap's
        for step, ckpt in list_checkpoints(folder):
            stats = image_stats(ev, ev.images(load_denoiser(ckpt)), job.task)
            curve.append((step, float(np.mean(stats["reward"]))))
            per_image.append(stats["reward"])
        result["curve"], result["curve_rewards"] = curve, per_image
    first, n = (2000, s.select_seeds) if job.stage == "sweep" else (1000, s.eval_seeds)
    ev = evaluator(job.world, n, first)
    result["final"] = image_stats(ev, ev.images(load_denoiser(folder / "final")), job.task)
    result["final"]["mean_reward"] = float(np.mean(result["final"]["reward"]))
    result["delta"] = delta_summary(metrics, job.steps)
    result["train"] = {
        "implicit_acc_last20": float(np.mean([m["implicit_acc"] for m in metrics[-20:]])),
        "loss_last20": float(np.mean([m["loss"] for m in metrics[-20:]])),
        "ref_divergence": [
            [m["step"], m["ref_divergence"]] for m in metrics if m.get("ref_divergence") is not None
        ],
        "ref_updates": max((m.get("ref_updates") or 0 for m in metrics), default=0),
        "ref_frozen_step": metrics[-1].get("ref_frozen_step"),
    }
    result["seconds"] = round(time.time() - t0, 1)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    for sub in ("checkpoints", "final"):  # evaluated: the numbers are in result.json
        shutil.rmtree(folder / sub, ignore_errors=True)
    return json.loads(result_path.read_text())  # as a later run reads it back (lists, not tuples)


def _init_worker() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _run_quietly(job: Job, s: StudySettings) -> dict[str, Any]:
    """Worker entry: the job's training log goes to its folder's train.log, not the study's terminal."""
    import contextlib

    folder = s.out / "runs" / job.name
    folder.mkdir(parents=True, exist_ok=True)
    with (
        open(folder / "train.log", "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            return run_job(job, s)
        except Exception:
            log.write(traceback.format_exc())
            raise


def run_jobs(jobs: list[Job], s: StudySettings, what: str) -> dict[str, dict]:
    """Run `jobs` on `s.workers` single-thread processes, longest first; return results by job name."""
    jobs = sorted(jobs, key=lambda j: -j.steps)
    results: dict[str, dict] = {}
    failed: list[str] = []
    t0 = time.time()

    def done(job: Job, res: dict) -> None:
        results[job.name] = res
        r = res["final"]["mean_reward"]
        print(
            f"   [{len(results)}/{len(jobs)}] {job.name}: reward {r:.3f} ({time.time() - t0:.0f} s)",
            flush=True,
        )

    if s.workers == 1:
        _init_worker()
        for job in jobs:
            done(job, _run_quietly(job, s))
        return results
    with ProcessPoolExecutor(s.workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(_run_quietly, job, s): job for job in jobs}
        for f in as_completed(futures):
            job = futures[f]
            try:
                done(job, f.result())
            except Exception as e:  # the others go on; the stage fails at the end
                failed.append(f"{job.name}: {e} (log: {s.out / 'runs' / job.name / 'train.log'})")
                print(f"   FAILED {failed[-1]}", flush=True)
    if failed:
        raise XdpoError(f"{what}: {len(failed)} job(s) failed; rerun to retry them:\n" + "\n".join(failed))
    return results
