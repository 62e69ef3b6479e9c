"""The second edition's report: per world and task, the sweep with its bracketing, the main arms with
hierarchical intervals (pair sets > seeds > images), steps-to-reach as a share of resamples, the per-class
view, the reward-versus-drift frontier and the ablation; every verdict is `hierarchy.verdict` of an interval.
Pure functions of the jobs' results (`runner.run_job`), the sweep's selection record and the pairs' sidecars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.apps.study import edition2 as e2
from xdpo.apps.study import plots
from xdpo.apps.study.hierarchy import (
    curve_tree,
    final_tree,
    grand_mean,
    hierarchical_bootstrap,
    reach_share,
    verdict,
)
from xdpo.apps.study.plan import pairs_stem

CONTRASTS = (("xdpo", "dpo"), ("dpo-at-xdpo", "dpo"), ("xdpo", "dpo-at-xdpo"))
N_RESAMPLES = 2000
PROMPTS = 20  # held-out prompts (xdpo.apps.digits.data.eval_prompts): the bootstrap's image clusters


def _fmt(m: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return f"{m:{f}} [{lo:{f}}, {hi:{f}}]"


def arms_of(results: dict[str, dict], world: str, task: str, stage: str) -> dict[str, list[dict]]:
    """method -> its results at (world, task, stage)."""
    out: dict[str, list[dict]] = {}
    for r in results.values():
        j = r["job"]
        if j["world"] == world and j.get("task", "bold") == task and j["stage"] == stage:
            out.setdefault(j["method"], []).append(r)
    order = list(e2.LABELS)  # the plan's order, not the order the jobs finished in
    return {
        m: sorted(out[m], key=_leaf) for m in sorted(out, key=lambda m: order.index(m) if m in order else 99)
    }


def common(*arms: list[dict]) -> list[list[dict]]:
    """Each arm's results restricted to the (pair set, seed) leaves every arm has (paired comparisons)."""
    keys = set.intersection(*[{_leaf(r) for r in runs} for runs in arms])
    return [sorted((r for r in runs if _leaf(r) in keys), key=_leaf) for runs in arms]


def _leaf(r: dict) -> tuple[int, int]:
    return int(r["job"].get("pair_set", 0)), int(r["job"]["seed"])


def _per_image(runs: list[dict], key: str) -> dict[tuple[int, int], np.ndarray]:
    return {_leaf(r): np.asarray(r["final"][key], dtype=float) for r in runs}


def arm_stats(runs: list[dict]) -> dict[str, Any]:
    """Grand means and hierarchical intervals of an arm's final reward and alignment, drift, diversity."""
    m, lo, hi = hierarchical_bootstrap(final_tree(runs), n_resamples=N_RESAMPLES, prompts=PROMPTS)
    al = hierarchical_bootstrap(_per_image(runs, "alignment"), n_resamples=N_RESAMPLES, prompts=PROMPTS)
    return {
        "beta": runs[0]["job"]["beta"], "lr": runs[0]["job"]["lr"], "leaves": len(runs),
        "pair_sets": len({_leaf(r)[0] for r in runs}), "reward": [m, lo, hi], "alignment": list(al),
        "drift": float(np.mean([r["final"]["drift"] for r in runs])),
        "diversity": float(np.mean([r["final"]["diversity"] for r in runs])),
        "ref_updates": float(np.mean([r["train"]["ref_updates"] for r in runs])),
        "ref_frozen_steps": [r["train"]["ref_frozen_step"] for r in runs],
    }  # fmt: skip


def contrast(a: list[dict], b: list[dict], name_a: str, name_b: str, key: str = "reward") -> dict[str, Any]:
    """a - b of the final images' `key` (reward, alignment) paired at every level over their common leaves,
    with its verdict sentence."""
    a, b = common(a, b)
    if not a:
        return {"leaves": 0, "verdict": f"{name_a} vs {name_b}: no common runs yet"}
    ta, tb = _per_image(a, key), _per_image(b, key)
    m, lo, hi = hierarchical_bootstrap(ta, tb, n_resamples=N_RESAMPLES, prompts=PROMPTS)
    what = "" if key == "reward" else f" in {key}"
    return {"leaves": len(a), "diff": [m, lo, hi], "verdict": verdict(name_a, name_b + what, m, lo, hi)}


def aligned_contrast(a: list[dict], b: list[dict], name_a: str, name_b: str) -> dict[str, Any]:
    """a - b on the images both draw as prompted (alignment 1 in both; the others left out per leaf)."""
    a, b = common(a, b)
    if not a:
        return {"leaves": 0, "verdict": f"{name_a} vs {name_b}: no common runs yet"}
    tree = {}
    for x, y in zip(a, b, strict=True):
        ok = (np.asarray(x["final"]["alignment"]) >= 1) & (np.asarray(y["final"]["alignment"]) >= 1)
        d = np.asarray(x["final"]["reward"], dtype=float) - np.asarray(y["final"]["reward"], dtype=float)
        tree[_leaf(x)] = np.where(ok, d, np.nan)
    share = float(np.mean([np.isfinite(v).mean() for v in tree.values()]))
    m, lo, hi = hierarchical_bootstrap(tree, n_resamples=N_RESAMPLES, prompts=PROMPTS)
    return {"leaves": len(a), "share": share, "diff": [m, lo, hi],
            "verdict": verdict(f"{name_a}", f"{name_b} on the images both draw as prompted", m, lo, hi)}  # fmt: skip


def reach(a: list[dict], b: list[dict]) -> dict[str, Any] | None:
    """Does a's mean curve reach b's final reward? (share of hierarchical resamples, `reach_share`)."""
    a, b = common(a, b)
    if not a or any("curve_rewards" not in r for r in a + b):
        return None
    steps, curves = curve_tree(a)
    return reach_share(steps, curves, curve_tree(b)[1], n_resamples=N_RESAMPLES, prompts=PROMPTS)


def per_class(arms: dict[str, list[dict]], prompts: list[str], a: str = "xdpo", b: str = "dpo") -> list[dict]:
    """Per prompted digit: every arm's mean reward and alignment, and a - b with its hierarchical interval."""
    from xdpo.apps.digits.data import prompt_digits

    digits = prompt_digits(prompts)
    rows = []
    pa, pb = common(arms[a], arms[b]) if a in arms and b in arms else ([], [])
    for d in sorted(set(digits.tolist())):
        idx = np.nonzero(digits == d)[0]
        row: dict[str, Any] = {"digit": int(d), "images": int(idx.size)}
        for m, runs in arms.items():
            row[m] = {key: float(grand_mean({k: v[idx] for k, v in _per_image(runs, key).items()}))
                      for key in ("reward", "alignment")}  # fmt: skip
        if pa:
            ta = {k: v[idx] for k, v in final_tree(pa).items()}
            tb = {k: v[idx] for k, v in final_tree(pb).items()}
            per = int(idx.size) * PROMPTS // len(digits)  # this digit's prompts (its images: per x seeds)
            row["diff"] = list(hierarchical_bootstrap(ta, tb, n_resamples=N_RESAMPLES, prompts=per))
        rows.append(row)
    return rows


def agreement(out: Path, world: str, task: str, pair_sets: int) -> list[float]:
    """The labeller's measured agreement with the true order, per pair set (from the pairs' sidecars)."""
    vals = []
    for k in range(pair_sets):
        side = out / "pairs" / f"{pairs_stem(world, task, k)}.parquet.json"
        if side.is_file():
            vals.append(float(json.loads(side.read_text())["agreement_with_true_reward"]))
    return vals


def world_task(s: e2.Settings, results: dict, selection: dict, world: str, task: str) -> dict[str, Any]:
    """Every number of one world and task (what `write_report` prints and results.json keeps)."""
    from xdpo.apps.demo.run import eval_prompts_and_seeds

    main = arms_of(results, world, task, "main")
    abl = arms_of(results, world, task, "ablation")
    names = {m: e2.label(m, world) for m in (*main, *abl)}
    out: dict[str, Any] = {"agreement": agreement(s.out, world, task, s.pair_sets)}
    cal_path = s.out / "calibration.json"
    out["calibration"] = (
        json.loads(cal_path.read_text()).get(f"{world}-{task}") if cal_path.is_file() else None
    )
    out["selection"] = selection.get(f"{world}-{task}")
    out["arms"] = {m: arm_stats(runs) for m, runs in main.items()}
    out["contrasts"] = [contrast(main[a], main[b], names[a], names[b]) | {"a": a, "b": b}
                        for a, b in CONTRASTS if a in main and b in main]  # fmt: skip
    if "xdpo" in main and "dpo" in main:
        out["aligned"] = aligned_contrast(main["xdpo"], main["dpo"], names["xdpo"], names["dpo"])
        out["alignment"] = contrast(main["xdpo"], main["dpo"], names["xdpo"], names["dpo"], key="alignment")
    out["reach"] = {
        m: reach(main[m], main["dpo"]) for m in ("xdpo", "dpo-at-xdpo") if m in main and "dpo" in main
    }
    prompts, seeds = eval_prompts_and_seeds(s.eval_seeds)
    out["per_class"] = per_class(main, [p for _ in seeds for p in prompts]) if main else []
    base_dpo = [r for r in main.get("dpo", []) if _leaf(r)[0] == 0]
    out["ablation"] = {
        m: arm_stats(runs) | {"vs_dpo": contrast(runs, base_dpo, names[m], names.get("dpo", "dpo"))}
        for m, runs in abl.items()
    }
    return out


def _sweep_lines(rec: dict | None, world: str) -> list[str]:
    if not rec:
        return ["Sweep not finished.", ""]
    lines = []
    for m, r in rec["methods"].items():
        c = r["chosen"]
        grid = r["grid"]
        lrs = sorted({g["lr"] for g in grid})
        betas = sorted({g["beta"] for g in grid})
        cell = {(g["beta"], g["lr"]): g for g in grid}
        lines += [f"**{e2.label(m, world)}**: chosen beta {c['beta']:g}, lr {c['lr']:g} (mean selection reward "
                  f"{c['reward']:.3f} over seeds {', '.join(map(str, rec['sweep_seeds']))}).", "",
                  "| beta \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]  # fmt: skip
        for b in betas:
            cells = []
            for lr in lrs:
                g = cell.get((b, lr))
                cells.append("" if g is None else f"{g['reward']:.3f} ({len(g['seeds'])} seed{'s' * (len(g['seeds']) > 1)}, "
                             f"align {g['alignment']:.2f}, drift {g['drift']:.3f})")  # fmt: skip
            lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
        added = ", ".join(f"(beta {b:g}, lr {lr:g})" for b, lr in r["added"]) or "none"
        edge = r["still_on_edge"]
        lines += ["", f"Points added to bracket the winner: {added}. "
                  + ("The winner's neighbours on both axes were all run (it is bracketed)." if not edge else
                     f"The winner is not bracketed after {len(r['added'])} additions (missing neighbours: "
                     + ", ".join(f"beta {b:g}, lr {lr:g}" for b, lr in edge) + ")."), ""]  # fmt: skip
    return lines


REACH_PHRASE = {
    "reaches": "reaches",
    "does not reach": "does not reach",
    "undecided": "is undecided on reaching",
}


def _reach_text(name: str, r: dict | None, target: str) -> str:
    """'<name> reaches <target>'s final reward (share of resamples [Wilson interval]; steps where it does)'."""
    if r is None:
        return f"{name}: no curves for {target}'s final reward"
    lo, hi = r["share_ci"]
    steps = "" if not math.isfinite(r["steps_median"]) else (
        f"; where it does, at step {r['steps_median']:.0f} [{r['steps_ci'][0]:.0f}, {r['steps_ci'][1]:.0f}]")  # fmt: skip
    return (f"{name} {REACH_PHRASE[r['verdict']]} {target}'s final reward ({100 * r['share']:.0f}% of resamples "
            f"reach it [{100 * lo:.0f}%, {100 * hi:.0f}%]{steps})")  # fmt: skip


def world_task_lines(wt: dict[str, Any], world: str, task: str) -> list[str]:
    agree = ", ".join(f"{a:.1%}" for a in wt["agreement"]) or "n/a"
    lines = [f"## {world} world, `{task}` task", "", f"Labeller agreement with the true order, per pair set: {agree}.",
             "", "### Sweep", "", *_sweep_lines(wt["selection"], world), "### Main arms", ""]  # fmt: skip
    lines += main_lines(wt, world) if wt["arms"] else ["Not run yet."]
    return lines + ablation_lines(wt, world)


def main_lines(wt: dict[str, Any], world: str) -> list[str]:
    bl = e2.BASELINE[world]
    lines = ["| arm | beta | lr | runs (pair sets) | hidden reward [95% CI] | alignment [95% CI] | drift | diversity |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, a in wt["arms"].items():
        lines.append(f"| {e2.label(m, world)} | {a['beta']:g} | {a['lr']:g} | {a['leaves']} ({a['pair_sets']}) | "
                     f"{_fmt(*a['reward'])} | {_fmt(*a['alignment'])} | {a['drift']:.3f} | {a['diversity']:.3f} |")  # fmt: skip
    lines += ["", "Paired differences (pair sets > seeds > images, 95% hierarchical bootstrap):", ""]
    lines += [f"- {c['verdict']} ({c['leaves']} paired runs)." for c in wt["contrasts"]]
    if "diff" in wt.get("alignment", {}):
        lines.append(f"- {wt['alignment']['verdict']} (prompt alignment, per image 0 or 1).")
    if "diff" in wt.get("aligned", {}):
        al = wt["aligned"]
        lines.append(f"- {al['verdict']} ({100 * al['share']:.0f}% of the images).")
    lines += ["", f"Does the arm's mean curve reach {bl}'s final reward?", ""]
    lines += [f"- {_reach_text(e2.label(m, world), r, bl)}." for m, r in wt["reach"].items()]
    if wt["per_class"]:
        ms = [m for m in wt["arms"]]
        lines += ["", "Per prompted digit (final images; reward / alignment):", "",
                  "| digit | " + " | ".join(e2.label(m, world) for m in ms) + " | xDPO minus " + bl + " [95% CI] |",
                  "|---" * (len(ms) + 2) + "|"]  # fmt: skip
        for row in wt["per_class"]:
            cells = [f"{row[m]['reward']:.2f} / {row[m]['alignment']:.2f}" for m in ms]
            diff = _fmt(*row["diff"], signed=True) if "diff" in row else ""
            lines.append(f"| {row['digit']} | " + " | ".join(cells) + f" | {diff} |")
    return lines


def ablation_lines(wt: dict[str, Any], world: str) -> list[str]:
    bl, lines = e2.BASELINE[world], []
    if wt["ablation"]:
        cal = wt.get("calibration") or {}
        lines += ["", f"### Ablation (pair set 0; each minus {bl} at its winner, paired by seed)", ""]
        if cal:
            lines += [f"Calibration on the base (pair set 0's preferred images, uniform t): Eq. 10's mean slope at "
                      f"delta = 0 is {cal['eq10_slope']:.3f} (mean per-element error {cal['e_ref_mean']:.4f}); "
                      f"{cal['elements']} elements per sample for the summed error.", ""]  # fmt: skip
        lines += ["| arm | beta | runs | hidden reward [95% CI] | alignment | drift | reference copies (frozen at "
                  f"step) | minus {bl} [95% CI] |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, a in wt["ablation"].items():
            d = a["vs_dpo"]
            diff = _fmt(*d["diff"], signed=True) if "diff" in d else "n/a"
            frozen = ", ".join("-" if f is None else str(f) for f in a["ref_frozen_steps"])
            copies = f"{a['ref_updates']:.1f} ({frozen})" if a["ref_updates"] else "0"
            lines.append(f"| {e2.label(m, world)} | {a['beta']:g} | {a['leaves']} | {_fmt(*a['reward'])} | "
                         f"{a['alignment'][0]:.2f} | {a['drift']:.3f} | {copies} | {diff} |")  # fmt: skip
        lines += [""] + [f"- {a['vs_dpo']['verdict']}." for a in wt["ablation"].values()]
    return [*lines, ""]


def online_lines(world: str, res: dict[str, Any]) -> list[str]:
    """The online arms' table (t intervals over their seeds) from `xdpo demo --online-rl`'s results.json."""
    seeds = res["settings"]["train_seeds"]
    lines = [f"### Online arms, {world} world, `{e2.NOISY_TASK}` task ({len(seeds)} seeds each; equal sampled images; "
             f"full report: [online/{world}/report.md](online/{world}/report.md))", "",
             "| arm | hidden reward [95% CI: t over seeds; one seed: over images] | alignment | drift |",
             "|---|---|---|---|",
             f"| base | {res['base']['mean']:.3f} | | |"]  # fmt: skip
    for a in sorted(res["arms"], key=lambda a: -a["reward"][0]):
        lines.append(f"| {a['name']} | {_fmt(*a['reward'])} | {a['alignment']:.2f} | {a['drift']:.3f} |")
    return [*lines, ""]


def answers(numbers: dict[str, dict], s: e2.Settings) -> list[str]:
    """The plain answers: each is a verdict computed from an interval in `numbers`; a world-task without the
    runs a question needs says so instead."""
    lines = ["## Answers", ""]
    for (w, t), wt in zip(s.world_tasks(), numbers.values(), strict=True):
        head = f"- **{w} world, `{t}` task**: "
        if not wt["arms"]:
            lines.append(head + "not run yet.")
            continue
        parts = [c["verdict"] for c in wt["contrasts"]]
        parts += [wt[k]["verdict"] for k in ("alignment", "aligned") if "diff" in wt.get(k, {})]
        parts += [_reach_text(e2.label(m, w), r, e2.BASELINE[w]) for m, r in wt["reach"].items() if r]
        sep = [a["vs_dpo"]["verdict"] for a in wt["ablation"].values() if "diff" in a["vs_dpo"]
               and (a["vs_dpo"]["diff"][1] > 0 or a["vs_dpo"]["diff"][2] < 0)]  # fmt: skip
        if wt["ablation"]:
            parts.append(f"of {len(wt['ablation'])} ablation arms, {len(sep)} separate from {e2.BASELINE[w]}"
                         + (": " + "; ".join(sep) if sep else ""))  # fmt: skip
        lines.append(head + "; ".join(parts) + ".")
    return [*lines, ""]


def write_report(
    s: e2.Settings, results: dict, selection: dict, timings: dict, online: dict[str, dict] | None = None
) -> Path:
    """report.md, results.json and the figures in s.out, over every finished world-task (and the online arms'
    results per world, `online`)."""
    numbers = {f"{w}-{t}": world_task(s, results, selection, w, t) for w, t in s.world_tasks()}
    lines = [
        "# xdpo study, second edition", "",
        f"{s.steps} optimizer steps of 16 pairs per run, {s.n_pairs} pairs per pair set, {len(s.seeds)} training "
        f"seeds x {s.pair_sets} pair sets per main arm; selection on {20 * s.select_seeds} images per point, final "
        f"rewards on {20 * s.eval_seeds} images (20 held-out prompts x {s.eval_seeds} seeds), curves on "
        f"{20 * s.curve_seeds} images per checkpoint. Intervals: 95% hierarchical bootstrap ({N_RESAMPLES} "
        "resamples: pair sets, then seeds within them, then the held-out prompts with all their seeds). Wall time "
        "so far: "
        + (", ".join(f"{k} {v / 60:.0f} min" for k, v in timings.items()) or "none") + ".", "",
        *answers(numbers, s),
    ]  # fmt: skip
    for (w, t), wt in zip(s.world_tasks(), numbers.values(), strict=True):
        lines += world_task_lines(wt, w, t)
        if wt["selection"]:
            plots.frontier_figure(s.out / f"frontier_{w}-{t}.png", wt, w, t)
            lines += [f"![reward vs drift](frontier_{w}-{t}.png)", ""]
    for w, res in (online or {}).items():
        lines += online_lines(w, res)
    (s.out / "results.json").write_text(
        json.dumps({"offline": numbers, "online": online or {}}, indent=1, default=float)
    )
    path = s.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
