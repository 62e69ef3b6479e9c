"""The demo report: a table in the shape of the xDPO paper's Table 2, curves, image grids, plain answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xdpo.evaluate.stats import keyed_scores, summarize, win_rate

REWARD, ALIGN = "digits-reward", "digits-alignment"


def _keyed(df, col: str) -> dict:
    return keyed_scores(zip(df["prompt"], df["seed"], strict=True), df[col], what=col)


def _pixels(folder: Path, df) -> dict:
    out = {}
    for p, sd, f in zip(df["prompt"], df["seed"], df["file"], strict=True):
        with Image.open(folder / f) as im:
            out[(p, sd)] = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return out


def drift_and_diversity(folder: Path, df, base_pixels: dict) -> tuple[float, float]:
    """Drift: RMS pixel change from the base at the same (prompt, seed). Diversity: mean RMS distance
    between images of the same prompt at different seeds (a collapse to one image per prompt gives 0)."""
    px = _pixels(folder, df)
    drift = float(
        np.mean([np.sqrt(np.mean((v - base_pixels[k]) ** 2)) for k, v in px.items() if k in base_pixels])
    )
    by_prompt: dict[str, list[np.ndarray]] = {}
    for (p, _), v in px.items():
        by_prompt.setdefault(p, []).append(v)
    dists = [
        np.sqrt(np.mean((a - b) ** 2))
        for imgs in by_prompt.values()
        for i, a in enumerate(imgs)
        for b in imgs[i + 1 :]
    ]
    return drift, float(np.mean(dists)) if dists else float("nan")


def steps_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """First step at which a reward curve reaches `target` (linear interpolation between checkpoints)."""
    for (s0, r0), (s1, r1) in zip(points, points[1:], strict=False):
        if r1 >= target:
            return float(s1) if r1 == r0 else s0 + (s1 - s0) * max(0.0, (target - r0) / (r1 - r0))
    return None


def mean_curve(curves: dict, slug: str, seeds) -> list[tuple[int, float]]:
    runs = [curves["runs"][f"{slug}-s{sd}"] for sd in seeds if f"{slug}-s{sd}" in curves["runs"]]
    steps = sorted(set.intersection(*[{p[0] for p in r} for r in runs])) if runs else []
    return [(st, float(np.mean([next(p[1] for p in r if p[0] == st) for r in runs]))) for st in steps]


def speed_up(dpo_steps: float, steps: float) -> float:
    """DPO's steps over a method's, as the table shows them (whole steps), so that equal steps read 1.00."""
    return round(dpo_steps) / max(round(steps), 1)


def _fmt(x: float | None, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def _pm(values: list[float], nd: int = 3) -> str:
    if len(values) < 2:
        return _fmt(values[0], nd)
    return f"{np.mean(values):.{nd}f} ± {np.std(values, ddof=1):.{nd}f}"


def write_report(s: Any, pairs: Path, runs: dict, curves: dict, tables: dict) -> Path:
    """report.md, results.json, curves.png, training.png, reference.png (when a run updates its reference),
    grid.png; return report.md."""
    from xdpo.apps.digits.pairs import sidecar_path

    out = s.out
    base = tables["base"]
    base_px = _pixels(out / "samples" / "base", base)
    base_drift, base_div = drift_and_diversity(out / "samples" / "base", base, base_px)
    dpo_slug, dpo_name = s.methods[0].slug, s.methods[0].name  # Diffusion-DPO, or Flow-DPO (flow family)
    rows: list[dict[str, Any]] = [
        {
            "method": "base",
            "reward": [float(base[REWARD].mean())],
            "reward_ci": summarize(base[REWARD])["ci95"],
            "win_base": [],
            "win_dpo": [],
            "alignment": [float(base[ALIGN].mean())],
            "drift": [0.0],
            "diversity": [base_div],
        }
    ]
    for m in s.methods:
        row = {
            "method": m.name,
            "slug": m.slug,
            "reward": [],
            "win_base": [],
            "win_dpo": [],
            "alignment": [],
            "drift": [],
            "diversity": [],
        }
        for seed in s.train_seeds:
            df = tables[f"{m.slug}-s{seed}"]
            row["reward"].append(float(df[REWARD].mean()))
            row["alignment"].append(float(df[ALIGN].mean()))
            row["win_base"].append(win_rate(_keyed(df, REWARD), _keyed(base, REWARD), ci=False)["win_rate"])
            if m.slug != dpo_slug:
                dpo = tables[f"{dpo_slug}-s{seed}"]
                row["win_dpo"].append(win_rate(_keyed(df, REWARD), _keyed(dpo, REWARD), ci=False)["win_rate"])
            d, v = drift_and_diversity(out / "samples" / f"{m.slug}-s{seed}", df, base_px)
            row["drift"].append(d)
            row["diversity"].append(v)
        rows.append(row)

    # steps to reach the DPO row's final reward (curves averaged over training seeds)
    dpo_curve = mean_curve(curves, dpo_slug, s.train_seeds)
    target = dpo_curve[-1][1] if dpo_curve else None
    speed = {}
    for m in s.methods:
        c = mean_curve(curves, m.slug, s.train_seeds)
        speed[m.slug] = steps_to_reach(c, target) if (c and target is not None) else None
    dpo_steps = speed.get(dpo_slug)

    _plot_curves(out / "curves.png", s, curves)
    _plot_training(out / "training.png", s, runs)
    has_ref = _plot_reference(out / "reference.png", s, runs)
    _grid(out / "grid.png", s, tables)

    side = json.loads(sidecar_path(pairs).read_text())
    flow = getattr(s, "family", "sd") == "flow"
    title = "# xdpo digits demo" + (", flow family (digits-flow)" if flow else "")
    lines = [
        title + (" (quick)" if s.quick else "") + (": ablation" if s.ablation else ""),
        "",
        f"Base: {_base_sentence(side) if flow else 'the shipped digits pipeline.'} "
        f"Pairs: {side['n_pairs']} from the base, labelled by the hidden labeller "
        f"(tie rate {side['tie_rate']:.2f}, label noise {side['noise_flip_rate']:.2f}, agreement of labels with the "
        f"true reward {side['agreement_with_true_reward']:.2f}). Training seeds: {', '.join(map(str, s.train_seeds))}. "
        f"Evaluation: {len(base)} samples of the held-out prompts at fixed seeds (same seeds for every model).",
        "",
        f"| method | hidden reward ↑ | win rate vs base | win rate vs {dpo_name} | prompt alignment | drift from base | diversity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reward = _pm(r["reward"]) + (
            f" [{r['reward_ci'][0]:.3f}, {r['reward_ci'][1]:.3f}]" if "reward_ci" in r else ""
        )
        lines.append(
            f"| {r['method']} | {reward} | {_pm(r['win_base'], 2) if r['win_base'] else '—'} | "
            f"{_pm(r['win_dpo'], 2) if r['win_dpo'] else '—'} | {_pm(r['alignment'], 2)} | {_pm(r['drift'])} | "
            f"{_pm(r['diversity'])} |"
        )
    lines += [
        "",
        "Values are means over training seeds (± their standard deviation when there are several); the base row "
        "gives a 95% bootstrap interval. Win rates compare the hidden reward of images at the same (prompt, seed), "
        "ties count 1/2. Drift: RMS pixel change from the base image at the same seed; diversity: RMS distance "
        "between seeds of the same prompt.",
        "",
        _samples_sentence(s, curves, tables),
        "",
        f"## Steps to reach {dpo_name}'s final reward",
        "",
        f"| method | steps | speed-up over {dpo_name} |",
        "|---|---|---|",
    ]
    for m in s.methods:
        st = speed.get(m.slug)
        ratio = speed_up(dpo_steps, st) if (st and dpo_steps) else None
        lines.append(f"| {m.name} | {_fmt(st, 0) if st is not None else 'not reached'} | {_fmt(ratio, 2)} |")
    interval = _checkpoint_interval(curves)
    if interval:
        lines += ["", f"Steps are read off the curves, interpolated between checkpoints {interval} steps apart: "
                  "differences within one interval are not resolved."]  # fmt: skip
    lines += ["", "## What this run says", "", *_answers(rows, speed, dpo_slug, s, dpo_name), ""]
    lines += [
        "## Figures",
        "",
        "- `curves.png`: hidden reward of same-seed samples against training steps (checkpoints), per method.",
        "- `training.png`: implicit accuracy and reward margin during training (from metrics.jsonl; methods "
        "whose series stay constant, e.g. SFT without a reference, are left out).",
        *(
            ["- `reference.png`: reference divergence and reward margin over steps (Kang et al. Fig. 1(b))."]
            if has_ref
            else []
        ),
        "- `grid.png`: one sample per digit, same seed in every row (base first).",
        "",
        "## How the settings were chosen",
        "",
        f"The digits{'-flow' if flow else ''} configs (`xdpo/configs/digits-{'flow-' if flow else ''}*.yaml`) say "
        "in their comments how beta and the learning rate were chosen for this world; the papers' values are for "
        f"{'SD3.5 / video models (Flow-DPO)' if flow else 'SD1.5'} at batch {'64' if flow else '256-2048'}.",
        "",
        "## Timings (seconds)",
        "",
        *[f"- {k}: {v}" for k, v in s.timings.items()],
        "",
    ]
    results = {"rows": rows, "steps_to_dpo_final": speed, "dpo_final_reward": target, "timings": s.timings}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _samples_sentence(s: Any, curves: dict, tables: dict) -> str:
    """Which samples the curves and the table are computed on (two sets: their base values differ)."""
    n_table, n_curve = len(tables["base"]), _curve_images(s)
    return (
        f"Samples: the table scores {n_table} images per model from `xdpo sample` ({s.eval_seeds} seeds per "
        f"held-out prompt, one generator per image; base {float(tables['base'][REWARD].mean()):.3f}); the "
        f"curves score {n_curve} other images per checkpoint ({s.curve_seeds} seeds per prompt, the noise drawn "
        f"once and reused at every checkpoint; base {curves['base']['reward']:.3f}). The two sets differ, so "
        "their base values differ: compare methods within one of them."
    )


def _curve_images(s: Any) -> int:
    from xdpo.apps.digits.data import eval_prompts

    return len(eval_prompts()) * s.curve_seeds  # `run.SameSeedEvaluator`'s prompts x seeds


def _checkpoint_interval(curves: dict) -> int | None:
    steps = sorted({p[0] for points in curves["runs"].values() for p in points})
    gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
    return min(gaps) if gaps else None


def _base_sentence(side: dict) -> str:
    """The flow family's base, as sampled for the pairs."""
    smp = side.get("sampling", {})
    return (
        "the shipped digits-flow pipeline (a StableDiffusion3Pipeline: an SD3 transformer trained by rectified "
        f"flow; {smp.get('steps', '?')} FlowMatchEuler steps, guidance {smp.get('guidance', '?')}). Flow-DPO is "
        "Diffusion-DPO's loss on velocity errors with a constant beta (Liu et al. 2025); xDPO and SFT use the "
        "same errors."
    )


def _answers(
    rows: list[dict], speed: dict, dpo_slug: str, s: Any, dpo_name: str = "Diffusion-DPO"
) -> list[str]:
    base = rows[0]
    by = {r.get("slug"): r for r in rows[1:]}
    out = []
    for r in rows[1:]:
        gain = np.mean(r["reward"]) - base["reward"][0]
        dal = np.mean(r["alignment"]) - base["alignment"][0]
        verdict = "raises" if gain > 0 and np.mean(r["win_base"]) > 0.5 else "does not raise"
        out.append(
            f"- {r['method']} {verdict} the hidden reward over the base (Δ {gain:+.3f}, win rate "
            f"{np.mean(r['win_base']):.2f}); prompt alignment {'kept' if dal > -0.02 else 'dropped'} (Δ {dal:+.2f})."
        )
    dpo = by.get(dpo_slug)
    for slug, r in by.items():
        if slug == dpo_slug or not slug.startswith("xdpo") or dpo is None:
            continue
        st, dst = speed.get(slug), speed.get(dpo_slug)
        ratio = f"{speed_up(dst, st):.2f}x" if st and dst else "not reached"
        higher = np.mean(r["reward"]) - np.mean(dpo["reward"])
        out.append(
            f"- {r['method']} vs {dpo_name}: steps to {dpo_name}'s final reward {ratio} (the paper claims ~1.5x"
            f"{'' if dpo_name == 'Diffusion-DPO' else ' over Diffusion-DPO'}); "
            f"final reward {'higher' if higher > 0 else 'not higher'} (Δ {higher:+.3f}, win rate "
            f"{np.mean(r['win_dpo']):.2f})."
        )
    if len(s.train_seeds) < 2:
        out.append("- One training seed only: differences of a few hundredths are within seed noise here.")
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(path: Path, s: Any, curves: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in s.methods:
        c = mean_curve(curves, m.slug, s.train_seeds)
        if c:
            ax.plot([p[0] for p in c], [p[1] for p in c], marker="o", label=m.name)
    ax.axhline(curves["base"]["reward"], color="grey", ls="--", label="base")
    ax.set(
        xlabel="training step",
        ylabel="mean hidden reward (same seeds)",
        title=f"Reward vs training steps ({_curve_images(s)} same-noise images per point)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _smooth(y: list[float], k: int = 10) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    k = max(1, min(k, len(y)))
    return np.convolve(y, np.ones(k) / k, mode="valid")


def _plot_training(path: Path, s: Any, runs: dict) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in s.methods:
        rows = _metrics(runs[(m.slug, s.train_seeds[0])])
        for ax, key in zip(axes, ("implicit_acc", "reward_margin"), strict=True):
            values = [r[key] for r in rows if r.get(key) is not None]
            if len(values) < 2 or np.ptp(values) == 0:  # e.g. SFT, which compares with no reference
                continue
            y = _smooth(values)
            ax.plot(np.arange(len(y)) + (len(values) - len(y)) + 1, y, label=m.name)
    axes[0].set(xlabel="step", ylabel="implicit accuracy (moving average)")
    axes[1].set(xlabel="step", ylabel="reward margin (moving average)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reference(path: Path, s: Any, runs: dict) -> bool:
    """Kang et al. Fig. 1(b): divergence from the initial model and reward margin over steps."""
    chosen = [m for m in s.methods if any(o.startswith("reference.strategy=") for o in m.overrides)]
    if not chosen:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax2 = ax.twinx()
    for m in chosen:
        rows = _metrics(runs[(m.slug, s.train_seeds[0])])
        checks = [(r["step"], r["ref_divergence"]) for r in rows if r.get("ref_divergence") is not None]
        if checks:
            ax.plot(*zip(*checks, strict=True), marker="o", label=f"{m.name}: divergence")
        y = _smooth([r["reward_margin"] for r in rows])
        ax2.plot(np.arange(len(y)) + len(rows) - len(y) + 1, y, ls=":", label=f"{m.name}: reward margin")
        frozen = next((r["ref_frozen_step"] for r in rows if r.get("ref_frozen_step")), None)
        if frozen:
            ax.axvline(frozen, color="red", alpha=0.4)
    ax.set(
        xlabel="step",
        ylabel="divergence from the initial model",
        title="Reference divergence and reward margin",
    )
    ax2.set_ylabel("reward margin (moving average)")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _grid(path: Path, s: Any, tables: dict) -> None:
    """Rows: base, then each method (first training seed); columns: one prompt per digit, first seed."""
    names = ["base"] + [f"{m.slug}-s{s.train_seeds[0]}" for m in s.methods]
    labels = ["base"] + [m.name for m in s.methods]
    base = tables["base"]
    seed0 = int(base["seed"].min())
    prompts = list(dict.fromkeys(base.loc[base["seed"] == seed0, "prompt"]))[:10]
    cell, scale = 32, 3
    canvas = Image.new("RGB", (len(prompts) * cell * scale, len(names) * cell * scale), "white")
    for i, name in enumerate(names):
        df = tables[name].set_index(["prompt", "seed"])
        for j, p in enumerate(prompts):
            with Image.open(s.out / "samples" / name / df.loc[(p, seed0), "file"]) as im:
                tile = im.convert("RGB").resize((cell * scale, cell * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (j * cell * scale, i * cell * scale))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(len(prompts) * 0.9 + 2, len(names) * 0.9 + 0.5))
    ax.imshow(canvas)
    ax.set_yticks([(i + 0.5) * cell * scale for i in range(len(names))], labels)
    ax.set_xticks([])
    ax.set_title("Same seed in every row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
