"""The `xdpo demo --online-rl` report: report.md, results.json and curves.png (reward vs images sampled and vs
compute seconds), from the arms' costs, checkpoint curves and final samples (online_rl.py).

With several training seeds, an arm's final reward and win rate are means over its seeds with Student-t 95%
intervals over the seeds (`t_interval`); with one seed, the reward's interval is the percentile bootstrap over
its evaluation images (`summarize`), which says nothing about the spread over training runs, and the report
says so. Verdicts are computed from the intervals: an arm leads only where its interval clears the others'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from xdpo.apps.demo import report as rep
from xdpo.apps.demo.report import ALIGN, REWARD, drift_and_diversity
from xdpo.evaluate.stats import summarize, t_interval, win_rate


def _plot(path: Path, s: Any, rows: list[dict], base_reward: float) -> None:
    plt = rep._plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        curves = np.array([[rw for _, rw, _ in c] for c in r["curves"]])  # seeds x checkpoints
        mean = curves.mean(axis=0)
        for ax, key in zip(axes, ("images", "seconds"), strict=True):
            x = [p[key] for p in r["points"]]
            (line,) = ax.plot(x, mean, marker="o", label=r["name"])
            if len(curves) > 1:
                ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
    for ax, label in zip(
        axes,
        ("images sampled", "compute seconds (steps + sampling, one thread; mean over seeds)"),
        strict=True,
    ):
        ax.axhline(base_reward, color="grey", ls="--", lw=1)
        ax.set(xlabel=label, ylabel="mean hidden reward (held-out prompts, fixed seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interval(values: list[float], fallback: dict | None = None) -> tuple[float, float, float]:
    """(mean, low, high) over seeds; with one seed, `fallback`'s bootstrap interval over images (if given)."""
    m, lo, hi = t_interval(values)
    if math.isnan(lo) and fallback is not None:
        lo, hi = fallback["ci95"]
    return m, lo, hi


def _rate_interval(rates: list[float]) -> tuple[float, float, float]:
    """The t interval of a rate over seeds, clipped to [0, 1] (nan stays nan)."""
    m, lo, hi = t_interval(rates)
    return m, lo if math.isnan(lo) else max(0.0, lo), hi if math.isnan(hi) else min(1.0, hi)


def arm_rows(s: Any, costs: dict, curves: dict, tables: dict) -> tuple[list[dict], dict, float]:
    """Per arm: each seed's final mean reward, win rate vs the base, alignment, drift and diversity; their
    intervals; the mean points and each seed's curve. Also the base's summary and diversity."""
    out, base = s.out, tables["base"]
    base_px = rep._pixels(out / "samples" / "base", base)
    _, base_div = drift_and_diversity(out / "samples" / "base", base, base_px)
    rows = []
    for m in s.methods:
        per: dict[str, list[float]] = {k: [] for k in ("reward", "win", "align", "drift", "div")}
        pooled = []
        for seed in s.train_seeds:
            df = tables[f"{m.slug}-s{seed}"]
            drift, div = drift_and_diversity(out / "samples" / f"{m.slug}-s{seed}", df, base_px)
            won = win_rate(rep._keyed(df, REWARD), rep._keyed(base, REWARD), ci=False)
            for k, v in zip(
                per, (df[REWARD].mean(), won["win_rate"], df[ALIGN].mean(), drift, div), strict=True
            ):
                per[k].append(float(v))
            pooled.extend(df[REWARD])
        one_seed = summarize(pooled) if len(s.train_seeds) == 1 else None
        rows.append({
            "slug": m.slug, "name": m.name, "seeds": list(s.train_seeds), "per_seed": per,
            "reward": _interval(per["reward"], one_seed), "win_base": _rate_interval(per["win"]),
            "alignment": float(np.mean(per["align"])), "drift": float(np.mean(per["drift"])),
            "diversity": float(np.mean(per["div"])), "points": costs[m.slug]["points"],
            "curves": [curves["runs"][f"{m.slug}-s{seed}"] for seed in s.train_seeds],
            "rounds": costs[m.slug]["seeds"][s.train_seeds[0]]["rounds"],
            "reference": [costs[m.slug]["seeds"][seed].get("reference", []) for seed in s.train_seeds],
        })  # fmt: skip
    return rows, summarize(base[REWARD]), base_div


def verdicts(rows: list[dict], base_mean: float) -> list[str]:
    """Sentences that hold for these intervals: which arm leads (only if its interval clears every other arm's),
    which arms' intervals overlap the leader's, and which arms beat the base (interval above its mean)."""
    ranked = sorted(rows, key=lambda r: r["reward"][0], reverse=True)
    lead, rest = ranked[0], ranked[1:]
    lines = []
    if any(math.isnan(r["reward"][1]) for r in rows):
        lines.append("- No intervals (one seed, one image): no arm is separated from another.")
        return lines
    tied = [r["name"] for r in rest if r["reward"][2] >= lead["reward"][1]]
    if tied:
        lines.append(
            f"- Highest mean final hidden reward: {lead['name']} ({lead['reward'][0]:.3f}), not separated from "
            f"{', '.join(tied)} (their intervals overlap its)."
        )
    else:
        lines.append(
            f"- {lead['name']} ends highest ({lead['reward'][0]:.3f} [{lead['reward'][1]:.3f}, "
            f"{lead['reward'][2]:.3f}]); its interval clears every other arm's."
        )
    above = [r["name"] for r in rows if r["reward"][1] > base_mean]
    below = [r["name"] for r in rows if r["reward"][1] <= base_mean]
    lines.append(
        f"- Above the base ({base_mean:.3f}) at the lower end of the interval: {', '.join(above) or 'none'}"
        + (f"; not shown above it: {', '.join(below)}." if below else ".")
    )
    return lines


def speedup(rows: list[dict]) -> list[str]:
    """The decoupled methods' claimed speed-up over likelihood-based RL, read from these arms: the best final
    reward of each kind with the compute seconds it took, and whether the intervals separate them."""
    kinds = {"decoupled": ("nft", "awm", "dgpo"), "likelihood-based": ("grpo", "grpo-window", "dpok", "d3po")}
    best = {}
    for kind, slugs in kinds.items():
        arms = [r for r in rows if r["slug"] in slugs]
        if not arms:
            return ["- No likelihood-based and decoupled arms side by side in this run: it says nothing of the "
                    "decoupled methods' claimed speed-up."]  # fmt: skip
        best[kind] = max(arms, key=lambda r: r["reward"][0])
    d, lk = best["decoupled"], best["likelihood-based"]
    one_seed = any(len(r.get("per_seed", {}).get("reward", (0, 0))) < 2 for r in (d, lk))
    if one_seed or any(math.isnan(v) for v in (*d["reward"], *lk["reward"])):
        return ["- One seed: the decoupled and the likelihood-based arms are not separated by an interval."]
    sec = f"{d['points'][-1]['seconds']:.0f} s vs {lk['points'][-1]['seconds']:.0f} s"
    if d["reward"][1] > lk["reward"][2]:
        verdict = "the decoupled arm ends higher at equal images sampled; its interval clears the other's"
    elif lk["reward"][1] > d["reward"][2]:
        verdict = (
            "the likelihood-based arm ends higher at equal images sampled; its interval clears the other's"
        )
    else:
        verdict = "their intervals overlap: not separated at equal images sampled"
    return [
        f"- Best decoupled arm {d['name']} ({d['reward'][0]:.3f}) vs best likelihood-based arm {lk['name']} "
        f"({lk['reward'][0]:.3f}), compute {sec}: {verdict}. The papers' 6-30x speed-ups are in steps or GPU "
        "hours to a target reward at tuned settings; this run's equal-images, equal-steps design measures reward "
        "at a fixed budget, not time to a target."
    ]


# (arm, the same arm with Kang et al.'s update): DGPO's stable arm also moves its DPO term's reference, so it is
# compared with DGPO's own moving-reference variant too (the EMA model in the DPO term, the code's use_ema_ref)
KANG_PAIRS = (("dgpo", "dgpo-stable"), ("dgpo-emaref", "dgpo-stable"), ("d3po", "d3po-stable"))


def kang_lines(rows: list[dict]) -> list[str]:
    """Kang et al.'s stable update on an arm: the paired (same seed) difference of the final hidden reward with
    its t interval over seeds, a verdict only where the interval excludes 0, and the reference's track (copies,
    freeze, D and the distances at the last check, first seed)."""
    by = {r["slug"]: r for r in rows}
    lines = []
    for arm, stable in KANG_PAIRS:
        if arm not in by or stable not in by:
            continue
        a, b = by[arm], by[stable]
        diff = [y - x for x, y in zip(a["per_seed"]["reward"], b["per_seed"]["reward"], strict=True)]
        m, lo, hi = t_interval(diff)
        if math.isnan(lo):
            verdict = "one seed: no interval, no verdict"
        elif lo > 0:
            verdict = "the update raises the final reward (the interval excludes 0)"
        elif hi < 0:
            verdict = "the update lowers the final reward (the interval excludes 0)"
        else:
            verdict = "not separated from 0"
        track = b["reference"][0]
        if track:
            step, d, to_init, to_pol, updates, frozen = track[-1]
            ref = (f"{updates} copies, {'frozen at step ' + str(frozen) if frozen is not None else 'never frozen'}; "
                   f"at step {step}: D {d if d is None else f'{d:.3g}'} (kang), ref_to_initial {to_init:.3g}, "
                   f"ref_to_policy {to_pol:.3g}")  # fmt: skip
        else:
            ref = "no reference checks logged"
        lines.append(
            f"- {b['name']} minus {a['name']}, final hidden reward paired by seed: {m:+.3f} [{lo:.3f}, {hi:.3f}]: "
            f"{verdict}. Reference (seed {b['seeds'][0]}): {ref}.".replace("nan", "—")
        )
    return lines


def _row(r: dict, per_seed_interval: bool) -> str:
    m, lo, hi = r["reward"]
    w = r["win_base"]
    win = f"{w[0]:.2f} [{w[1]:.2f}, {w[2]:.2f}]" if per_seed_interval else f"{w[0]:.2f}"
    seeds = ", ".join(f"{v:.3f}" for v in r["per_seed"]["reward"])
    return (
        f"| {r['name']} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {seeds} | {win} | {r['alignment']:.2f} | "
        f"{r['drift']:.3f} | {r['diversity']:.3f} | {r['points'][-1]['seconds']:.0f} |"
    )


def write_report(s: Any, costs: dict, curves: dict, tables: dict, load: dict) -> Path:
    out, n_seeds = s.out, len(s.train_seeds)
    rows, b, base_div = arm_rows(s, costs, curves, tables)
    _plot(out / "curves.png", s, rows, curves["base"]["reward"])
    many = n_seeds > 1
    scope = (
        f"{n_seeds} training seeds per arm ({', '.join(map(str, s.train_seeds))}); the intervals are Student-t 95% "
        "intervals over the seeds (the final reward and the win rate: one value per seed)"
        if many
        else "**one training seed**: the reward's interval resamples evaluation images, not training runs, so it "
        "says nothing about the spread over seeds"
    )
    lines = [
        f"# xdpo digits demo: online alignment on rollouts ({s.base}){' (quick)' if s.quick else ''}",
        "",
        f"{scope}. {s.rounds} rounds, hyperparameters not tuned per method.",
        "",
        f"Every arm: `{s.methods[0].config}` (its model, lr, batch, {s.max_steps} optimizer steps), trained on the noisy "
        f"labeller (the `{s.task}` task's hidden reward + Gumbel noise, scale 0.5), **{s.images} images sampled** "
        f"({s.rounds} x {s.prompts_per_round} prompts x {s.per_prompt}; offline: all from the base at step 0) at "
        f"{s.sample_steps} sampling steps; online arms: {s.rounds} rounds of {s.every} steps. Evaluation: the hidden "
        f"reward and the legibility check (prompt alignment) of {len(tables['base'])} samples of the held-out prompts "
        "at fixed seeds, the same for every model and seed.",
        "",
        "| arm | hidden reward ↑ [95% CI] | per seed | win rate vs base | prompt alignment | drift from base | "
        "diversity | compute s |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | {b['mean']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] (images) | — | — | "
        f"{tables['base'][ALIGN].mean():.2f} | 0.000 | {base_div:.3f} | — |".replace("nan", "—"),
        *[_row(r, many).replace("nan", "—") for r in rows],
        "",
        "## Hidden reward at each round boundary (held-out prompts, fixed seeds; mean over seeds)",
        "",
        "| arm | " + " | ".join(f"step {p['step']}" for p in rows[0]["points"]) + " |",
        "|---|" + "---|" * len(rows[0]["points"]),
    ]
    for r in rows:
        mean = np.array([[rw for _, rw, _ in c] for c in r["curves"]]).mean(axis=0)
        cells = [
            f"{v:.3f} ({p['images']} img, {p['seconds']:.0f} s)"
            for v, p in zip(mean, r["points"], strict=True)
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Each round's monitors, seed {s.train_seeds[0]} (held-out: the hidden reward, never trained on, "
              "of the round's images and of 8 fixed-seed ones)", "",
              "| arm | round | images/s | noisy reward | held-out | held-out, fixed seeds | diversity | drift (fixed seeds) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for q in r["rounds"]:
            lines.append(
                f"| {r['name']} | {q['round']} | {q['images_per_second'] or 0:.1f} | {q['score_mean']:.3f} | "
                f"{rep._fmt(q['heldout'])} | {rep._fmt(q['heldout_fixed'])} | {rep._fmt(q['diversity'])} | "
                f"{rep._fmt(q['drift'])} |"
            )
    from xdpo.apps.demo.run import run_config

    lr = run_config(s, s.methods[0], s.train_seeds[0], s.prompts_file).train.learning_rate
    lines += [
        "",
        "## What this run says",
        "",
        *verdicts(rows, b["mean"]),
        "- Equal images sampled is not equal compute: the DPO arms train on one pair per group, the rollout arms on "
        "every image (NFT and AWM at several grid steps, with extra reference / initial forwards); the compute column "
        "and curves.png (right) show the cost.",
        f"- Every arm trains at its world's DPO config's learning rate ({lr:g}, full fine-tune), not the rollout "
        "papers' (3e-4 with LoRA); their losses have other scales than DPO's, so equal lr is not an equal step: a "
        "slower arm here is not shown to be a worse method.",
        *speedup(rows),
        *kang_lines(rows),
        "",
        f"Figure: `curves.png` (lines: mean over seeds; bands: min to max over seeds). Timings of this invocation "
        f"(s; load average {load['start']} -> {load['end']}, {load['cpus']} CPUs): "
        + ", ".join(f"{k} {v}" for k, v in s.timings.items()),
        "",
    ]
    results = {"settings": {k: getattr(s, k) for k in ("family", "quick", "rounds", "prompts_per_round", "per_prompt",
                                                       "every", "sample_steps", "max_steps", "train_seeds", "eval_seeds", "task")},
               "base": b, "arms": rows, "timings": s.timings, "load": load}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
