"""The study's report: tables per world, the Kang et al. ablation, the sweep, figures, plain answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.study import plots
from xdpo.study.plan import ABLATION, BASELINE, N_XDPO, XDPO_SLOPE_AT_0, StudySettings, label
from xdpo.study.stats import (
    Runs,
    diff_interval,
    steps_to_reach_baseline,
    t_interval,
    win_interval,
    xdpo_slope_ratio,
)

MAIN_ORDER = ("dpo", "xdpo", "xdpo-eq9", "xdpo-matched", "xdpo-eq9-matched", "sft")
ABLATION_ORDER = ("dpo", *ABLATION, "kto", "xdpo")


def _ci(m: float, lo: float, hi: float, nd: int = 3) -> str:
    if math.isnan(lo):
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def _steps(r: dict[str, Any]) -> str:
    if not math.isfinite(r["steps"]):
        return f"not reached ({100 * r['reached_fraction']:.0f}% of resamples reach it)"
    hi = "not reached" if not math.isfinite(r["steps_ci"][1]) else f"{r['steps_ci'][1]:.0f}"
    return f"{r['steps']:.0f} [{r['steps_ci'][0]:.0f}, {hi}]; ratio {r['ratio']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]"


def group(results: dict[str, dict]) -> dict[str, dict[str, Runs]]:
    """world -> method -> runs in seed order."""
    out: dict[str, dict[str, Runs]] = {}
    for res in results.values():
        j = res["job"]
        out.setdefault(j["world"], {}).setdefault(j["method"], []).append(res)
    for methods in out.values():
        for runs in methods.values():
            runs.sort(key=lambda r: r["job"]["seed"])
    return out


def row_stats(runs: Runs, dpo: Runs, base: list[float]) -> dict[str, Any]:
    last = [r["delta"]["phases"][-1] for r in runs if r["delta"]["phases"]]
    beyond = float(np.mean([p["beyond_1"] for p in last])) if last else math.nan
    reach = steps_to_reach_baseline(runs, dpo) if "curve" in runs[0] and "curve" in dpo[0] else None
    return {
        "beta": runs[0]["job"]["beta"],
        "lr": runs[0]["job"]["lr"],
        "steps": runs[0]["job"]["steps"],
        "seeds": [r["job"]["seed"] for r in runs],
        "reward": t_interval([r["final"]["mean_reward"] for r in runs]),
        "vs_dpo": diff_interval(runs, dpo),
        "win_vs_dpo": win_interval(runs, dpo),
        "win_vs_base": win_interval(runs, base),
        "alignment": float(np.mean([np.mean(r["final"]["alignment"]) for r in runs])),
        "drift": float(np.mean([r["final"]["drift"] for r in runs])),
        "diversity": float(np.mean([r["final"]["diversity"] for r in runs])),
        "reach": reach,
        "ndelta_beyond_1_last_third": beyond,
        "ndelta_q_last_third": np.mean([p["quantiles"] for p in last], axis=0).tolist() if last else [],
    }


def table(rows: dict[str, dict], world: str, same: bool) -> list[str]:
    bl = BASELINE[world]
    lines = [
        f"| method | beta | lr | hidden reward ↑ [95% CI] | minus {bl} | win rate vs {bl} | win rate vs base "
        f"| alignment | drift | diversity | steps to {bl}'s final reward; {bl} steps / these | share of "
        "\\|n δ\\| > 1 (last third) |",
        "|---" * 12 + "|",
    ]
    for key, r in rows.items():
        dpo_row = key == "dpo"
        reach = (
            "—"
            if r["reach"] is None
            else (f"{r['reach']['baseline_steps']:.0f}" if dpo_row else _steps(r["reach"]))
        )
        lines.append(
            f"| {label(key, world)} | {r['beta']:g} | {r['lr']:g} | {_ci(*r['reward'])} | "
            f"{'—' if dpo_row else _ci(*r['vs_dpo'])} | {'—' if dpo_row else _ci(*r['win_vs_dpo'], nd=2)} | "
            f"{_ci(*r['win_vs_base'], nd=2)} | {r['alignment']:.2f} | {r['drift']:.3f} | {r['diversity']:.3f} | "
            f"{reach} | {r['ndelta_beyond_1_last_third']:.2f} |"
        )
    return lines + ([""] if same else [])


def sweep_table(selection: dict, world: str) -> list[str]:
    lines = [
        "| method | " + " | ".join(["beta, lr: reward (share \\|n δ\\| > 1, last third)"]) + " |",
        "|---|---|",
    ]
    for method, rows in selection["grid"][world].items():
        best = selection["chosen"][world][method]
        cells = []
        for r in rows:
            mark = "**" if (r["beta"], r["lr"]) == (best["beta"], best["lr"]) else ""
            share = r.get("ndelta_beyond_1_last_third")
            share_s = (
                "" if share is None or (isinstance(share, float) and math.isnan(share)) else f" ({share:.2f})"
            )
            beta = "—" if method == "sft" else f"{r['beta']:g}"
            cells.append(f"{mark}{beta}, {r['lr']:g}: {r['reward']:.2f}{share_s}{mark}")
        lines.append(f"| {label(method, world)} | {'; '.join(cells)} |")
    return lines


def verdict(m: float, lo: float, hi: float, up: str, down: str, same: str) -> str:
    if math.isnan(lo):
        return same
    return up if lo > 0 else down if hi < 0 else same


def answers(rows: dict[str, dict[str, dict]], grouped: dict, s: StudySettings) -> list[str]:
    """The plain answers, each derived from the numbers in the tables."""
    out = []
    for world, wr in rows.items():
        bl = BASELINE[world]
        for key in ("xdpo", "xdpo-eq9", "xdpo-matched", "xdpo-eq9-matched"):
            if key not in wr:
                continue
            r, name = wr[key], label(key, world)
            reach = r["reach"]
            if reach is None:
                speed = "no curve"
            elif not math.isfinite(reach["steps"]):
                speed = f"**no**: its mean curve never reaches {bl}'s final reward {reach['target']:.3f} in {r['steps']} steps"
            else:
                lo, hi = reach["ratio_ci"]
                kind = (
                    "**yes**"
                    if lo > 1
                    else "**no** (slower)"
                    if hi < 1
                    else "**not detectably** (the interval holds 1)"
                )
                speed = (
                    f"{kind}: {reach['steps']:.0f} steps against {bl}'s {reach['baseline_steps']:.0f} "
                    f"(ratio {reach['ratio']:.2f}, 95% CI [{lo:.2f}, {hi:.2f}]; the xDPO paper reports ~1.5)"
                )
            end = verdict(*r["vs_dpo"], "**yes**", "**no, lower**", "**no detectable difference**")
            out.append(
                f"- {world} world, {name} (beta {r['beta']:g}, lr {r['lr']:g}): fewer steps to {bl}'s final "
                f"reward? {speed}. Ends higher? {end}: {_ci(*r['vs_dpo'])} reward, same-seed win rate "
                f"{_ci(*r['win_vs_dpo'], nd=2)}."
            )
        dpo_q, x = wr["dpo"]["ndelta_q_last_third"], wr.get("xdpo")
        if x and dpo_q and x["ndelta_q_last_third"]:
            xq = x["ndelta_q_last_third"]
            runs = grouped[world]["xdpo"]
            counts = np.sum([r["delta"]["phases"][-1]["counts"] for r in runs], axis=0)
            slope = xdpo_slope_ratio(counts.tolist(), runs[0]["delta"]["bins"])
            out.append(
                f"- Where in delta ({world} world, last third of training, n = {N_XDPO:g}): n·δ of {bl} has median "
                f"{dpo_q[2]:+.2f} (90% in [{dpo_q[0]:+.2f}, {dpo_q[4]:+.2f}]), share |n δ| > 1 "
                f"{wr['dpo']['ndelta_beyond_1_last_third']:.2f}; xDPO's has median {xq[2]:+.2f} (90% in "
                f"[{xq[0]:+.2f}, {xq[4]:+.2f}]), share {x['ndelta_beyond_1_last_third']:.2f}. Over xDPO's own "
                f"images its slope eta + exp(n δ) averaged {slope:.2f}x its value at δ = 0: it acted as "
                f"{bl} with beta x {XDPO_SLOPE_AT_0 * slope:.2f}"
                + (
                    "; its images stayed mostly in the small regime, where the two objectives coincide up to beta."
                    if x["ndelta_beyond_1_last_third"] < 0.2
                    else "; a real share of images sat where the transform departs from DPO's (|n δ| > 1)."
                )
            )
    return out


def kang_answers(ab: dict[str, dict]) -> list[str]:
    if "dpo-ref" not in ab:
        return []
    ref, ts, both = ab["dpo-ref"]["vs_dpo"], ab["dpo-ts"]["vs_dpo"], ab["dpo-both"]["vs_dpo"]
    share = ref[0] / both[0] if both[0] > 0 else math.nan
    out = [
        f"- *The stable reference update gives most of the gain*: + reference update {_ci(*ref)} over "
        f"Diffusion-DPO, both together {_ci(*both)} (the update's share {share:.0%}). "
        + verdict(
            *ref,
            "It helps (interval above 0)",
            "It hurts (interval below 0)",
            "Not distinguishable from 0 with these seeds",
        )
        + (
            f"; share above half: {'reproduces' if share > 0.5 and ref[1] > 0 else 'does not reproduce'}."
            if not math.isnan(share)
            else "."
        ),
        f"- *Timestep-aware training alone hurts*: {_ci(*ts)} — "
        + verdict(
            *ts, "contradicted (it helps here)", "reproduces (it hurts here)", "not distinguishable from 0"
        ),
    ]
    t4, dpo = ab["dpo-tau4"], ab["dpo"]
    peak = float(np.max([max(p[1] for p in r["curve"]) for r in t4["runs"]]))
    collapse = t4["reward"][0] < 0 or t4["alignment"] < 0.9 or t4["reward"][0] < peak - 0.5
    out.append(
        f"- *A small tau without the guard collapses*: tau 4 without the guard for {t4['steps']} steps ends at "
        f"reward {_ci(*t4['reward'])} (its curves' peak {peak:.3f}; Diffusion-DPO {dpo['reward'][0]:.3f} at "
        f"{dpo['steps']} steps), alignment {t4['alignment']:.2f}, diversity {t4['diversity']:.3f} (Diffusion-DPO "
        f"{dpo['diversity']:.3f}) — "
        + (
            "it collapses (reward or alignment falls)."
            if collapse
            else "no collapse in reward or alignment within these steps."
        )
    )
    if "kto" in ab:
        k = ab["kto"]
        out.append(
            f"- Diffusion-KTO at its own best (beta {k['beta']:g}, lr {k['lr']:g}): {_ci(*k['vs_dpo'])} vs Diffusion-DPO."
        )
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_report(s: StudySettings, sweep: dict, chosen: dict, main: dict, timings: dict, est: dict) -> Path:
    """report.md, results.json and the figures in s.out; return report.md."""
    from xdpo.study.runner import evaluator, image_stats

    grouped = group(main)
    selection = json.loads((s.out / "selection.json").read_text())
    rows: dict[str, dict[str, dict]] = {}
    ablation: dict[str, dict] = {}
    md = [
        "# Where xDPO and Diffusion-DPO differ: the digits study",
        "",
        f"`xdpo study` ({'quick smoke run' if s.quick else 'full run'}): {len(s.seeds)} training seeds per method, "
        f"{s.steps} optimizer steps of 16 pairs, {s.n_pairs} pairs per world from each base labelled by the hidden "
        f"labeller. Each method's beta and lr are its best point of the same sweep budget (one seed, "
        f"{20 * s.select_seeds} samples at selection seeds 2000+); final models are scored on {20 * s.eval_seeds} "
        f"held-out samples at seeds 1000+ (the same noise for every model), curves on {20 * s.curve_seeds}. "
        "Intervals are 95% Student-t over training seeds (paired by seed for differences and win rates); "
        "steps-to-reach intervals are a percentile bootstrap over seeds. Time: "
        + ", ".join(f"{k.split(' ')[0]} {v / 60:.0f} min" for k, v in timings.items())
        + f" (estimate up front: {est['total'] / 60:.0f} min).",
        "",
    ]
    for world, methods in grouped.items():
        ev = evaluator(world, s.eval_seeds, 1000)
        base = image_stats(ev, ev.base_images)["reward"]
        dpo = methods["dpo"]
        rows[world] = {k: row_stats(methods[k], dpo, base) for k in MAIN_ORDER if k in methods}
        base_curve = dpo[0]["curve"][0][1]
        md += [
            f"## {world} world ({'UNet base `digits`' if world == 'sd' else 'flow base `digits-flow`'})",
            "",
        ]
        md += [f"Base: hidden reward {np.mean(base):.3f} on the final-evaluation samples.", ""]
        md += table(rows[world], world, True)
        plots.curves_figure(
            s.out / f"curves_{world}.png",
            {label(k, world): methods[k] for k in rows[world]},
            base_curve,
            f"{world} world: reward vs step",
        )
        plots.delta_figure(
            s.out / f"delta_{world}.png",
            {
                label(k, world): methods[k]
                for k in ("dpo", "xdpo", "xdpo-eq9", "xdpo-matched")
                if k in methods
            },
            dpo[0]["delta"]["bins"],
            f"{world} world: n·δ over training (all seeds)",
        )
        md += [f"![curves](curves_{world}.png)", "", f"![delta](delta_{world}.png)", ""]
        md += ["Sweep (one seed; bold = chosen):", "", *sweep_table(selection, world), ""]
        if world == "sd":
            ablation = {
                k: row_stats(methods[k], dpo, base) | {"runs": methods[k]}
                for k in ABLATION_ORDER
                if k in methods
            }
            md += ["## Kang et al. ablation (UNet base, Diffusion-DPO's chosen beta and lr)", ""]
            md += table({k: v for k, v in ablation.items()}, world, True)
            plots.curves_figure(
                s.out / "ablation.png",
                {label(k, world): methods[k] for k in ablation},
                base_curve,
                "Kang et al. ablation",
            )
            plots.divergence_figure(
                s.out / "reference.png",
                {label(k, world): methods[k] for k in ("dpo-ref", "dpo-both", "dpo-tau4") if k in methods},
            )
            md += ["![ablation](ablation.png)", "", "![reference divergence](reference.png)", ""]
    md += ["## Plain answers", "", *answers(rows, grouped, s), *kang_answers(ablation), ""]
    report = s.out / "report.md"
    report.write_text("\n".join(md))
    results = {
        "settings": {k: v for k, v in vars(s).items() if k not in ("out", "grids")} | {"grids": str(s.grids)},
        "selection": selection,
        "rows": rows,
        "ablation": {k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in ablation.items()},
        "runs": {name: {k: v for k, v in res.items()} for name, res in main.items()},
        "timings_s": timings,
    }
    (s.out / "results.json").write_text(json.dumps(_json_safe(results), indent=1, default=str))
    return report
