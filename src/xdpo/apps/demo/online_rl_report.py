"""The `xdpo demo --online-rl` report: report.md, results.json and curves.png (reward vs images sampled and vs
compute seconds), from the arms' costs, checkpoint curves and final samples (online_rl.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xdpo.apps.demo import report as rep
from xdpo.apps.demo.report import ALIGN, REWARD, drift_and_diversity
from xdpo.evaluate.stats import summarize, win_rate


def _plot(path: Path, s: Any, costs: dict, curves: dict) -> None:
    plt = rep._plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seed = s.train_seeds[0]
    for m in s.methods:
        rewards = [r for _, r, _ in curves["runs"][f"{m.slug}-s{seed}"]]
        pts = costs[m.slug]["points"]
        for ax, key in zip(axes, ("images", "seconds"), strict=True):
            ax.plot([p[key] for p in pts], rewards, marker="o", label=m.name)
    for ax, label in zip(
        axes, ("images sampled", "compute seconds (steps + sampling, one thread)"), strict=True
    ):
        ax.axhline(curves["base"]["reward"], color="grey", ls="--", lw=1)
        ax.set(xlabel=label, ylabel="mean hidden reward (held-out prompts, fixed seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(s: Any, costs: dict, curves: dict, tables: dict, load: dict) -> Path:
    out, base, seed = s.out, tables["base"], s.train_seeds[0]
    base_px = rep._pixels(out / "samples" / "base", base)
    _, base_div = drift_and_diversity(out / "samples" / "base", base, base_px)
    rows = []
    for m in s.methods:
        df = tables[f"{m.slug}-s{seed}"]
        drift, div = drift_and_diversity(out / "samples" / f"{m.slug}-s{seed}", df, base_px)
        won = win_rate(rep._keyed(df, REWARD), rep._keyed(base, REWARD))
        rows.append({"slug": m.slug, "name": m.name, "reward": summarize(df[REWARD]), "alignment": float(df[ALIGN].mean()),
                     "win_base": won, "drift": drift, "diversity": div, "points": costs[m.slug]["points"],
                     "curve": curves["runs"][f"{m.slug}-s{seed}"], "rounds": costs[m.slug]["rounds"]})  # fmt: skip
    _plot(out / "curves.png", s, costs, curves)
    b = summarize(base[REWARD])
    lines = [
        f"# xdpo digits demo: online alignment on rollouts ({s.base}){' (quick)' if s.quick else ''}",
        "",
        "**A smoke-scale measurement**: one training seed, "
        f"{s.rounds} rounds, hyperparameters not tuned per method; the intervals resample evaluation images, not "
        "training runs, so they say nothing about the spread over seeds.",
        "",
        f"Every arm: `{s.methods[0].config}` (its model, lr, batch, {s.max_steps} optimizer steps), trained on the noisy "
        f"labeller (`noisy_reward`: hidden reward + Gumbel noise, scale 0.5), **{s.images} images sampled** "
        f"({s.rounds} x {s.prompts_per_round} prompts x {s.per_prompt}; offline: all from the base at step 0) at "
        f"{s.sample_steps} sampling steps; online arms: {s.rounds} rounds of {s.every} steps. Evaluation: the hidden "
        f"reward and the legibility check (prompt alignment) of {len(base)} samples of the held-out prompts at fixed "
        "seeds, the same for every model.",
        "",
        "| arm | hidden reward ↑ [95% CI] | win rate vs base | prompt alignment | drift from base | diversity | compute s |",
        "|---|---|---|---|---|---|---|",
        f"| base | {b['mean']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] | — | {base[ALIGN].mean():.2f} | 0.000 | "
        f"{base_div:.3f} | — |".replace("nan", "—"),
    ]
    for r in rows:
        ci, w = r["reward"]["ci95"], r["win_base"]
        lines.append(
            f"| {r['name']} | {r['reward']['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {w['win_rate']:.2f} "
            f"[{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}] | {r['alignment']:.2f} | {r['drift']:.3f} | {r['diversity']:.3f} | "
            f"{r['points'][-1]['seconds']:.0f} |".replace("nan", "—")
        )
    lines += ["", "## Hidden reward at each round boundary (held-out prompts, fixed seeds)", "",
              "| arm | " + " | ".join(f"step {p['step']}" for p in rows[0]["points"]) + " |",
              "|---|" + "---|" * len(rows[0]["points"])]  # fmt: skip
    for r in rows:
        cells = [
            f"{rw:.3f} ({p['images']} img, {p['seconds']:.0f} s)"
            for (_, rw, _), p in zip(r["curve"], r["points"], strict=True)
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Each round's monitors (held-out: the hidden reward, never trained on, of the round's images and of 8 fixed-seed ones)", "",
              "| arm | round | images/s | noisy reward | held-out | held-out, fixed seeds | diversity | drift (fixed seeds) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for q in r["rounds"]:
            lines.append(
                f"| {r['name']} | {q['round']} | {q['images_per_second'] or 0:.1f} | {q['score_mean']:.3f} | "
                f"{rep._fmt(q['heldout'])} | {rep._fmt(q['heldout_fixed'])} | {rep._fmt(q['diversity'])} | "
                f"{rep._fmt(q['drift'])} |"
            )
    best = max(rows, key=lambda r: r["reward"]["mean"])
    from xdpo.apps.demo.run import run_config

    lr = run_config(s, s.methods[0], seed, s.prompts_file).train.learning_rate
    lines += [
        "",
        "## What this run says",
        "",
        f"- Highest final hidden reward: {best['name']} ({best['reward']['mean']:.3f}; base {b['mean']:.3f}). Arms whose "
        "intervals overlap are not separated by this run.",
        "- Equal images sampled is not equal compute: the DPO arms train on one pair per group, the rollout arms on "
        "every image (NFT and AWM at several grid steps, with extra reference / initial forwards); the compute column "
        "and curves.png (right) show the cost.",
        f"- Every arm trains at its world's DPO config's learning rate ({lr:g}, full fine-tune), not the rollout "
        "papers' (3e-4 with LoRA); their losses have other scales than DPO's, so equal lr is not an equal step: a "
        "slower arm here is not shown to be a worse method.",
        "- The papers' speed-ups are measured against likelihood-based RL (Flow-GRPO), which xdpo does not have yet "
        "(part 2): this run cannot confirm or refute them.",
        "",
        f"Figure: `curves.png`. Timings of this invocation (s; load average {load['start']} -> {load['end']}, "
        f"{load['cpus']} CPUs): " + ", ".join(f"{k} {v}" for k, v in s.timings.items()),
        "",
    ]
    results = {"settings": {k: getattr(s, k) for k in ("family", "quick", "rounds", "prompts_per_round", "per_prompt",
                                                       "every", "sample_steps", "max_steps", "train_seeds", "eval_seeds")},
               "base": b, "arms": rows, "timings": s.timings, "load": load}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
