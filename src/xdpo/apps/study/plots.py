"""The study's figures: reward-vs-step curves with 95% bands, n*delta histograms, the ablation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xdpo.apps.study.stats import Runs, curve_band


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(path: Path, groups: dict[str, Runs], base_reward: float, title: str) -> None:
    """Mean hidden reward vs step per method, shaded 95% t interval over training seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        if not runs or "curve" not in runs[0]:
            continue
        steps, mean, lo, hi = curve_band(runs)
        style = "--" if "matched" in label or "tau 4" in label else "-"
        (line,) = ax.plot(steps, mean, style, marker="o", ms=3, label=f"{label} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(base_reward, color="gray", lw=0.8, ls=":", label="base")
    ax.set_xlabel("optimizer step (16 pairs)")
    ax.set_ylabel("mean hidden reward (held-out prompts, fixed seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def delta_figure(path: Path, groups: dict[str, Runs], edges: list[float], title: str) -> None:
    """Histograms of n*delta (n = 6; all images of all seeds) per method, one panel per third of training."""
    plt = _plt()
    groups = {k: v for k, v in groups.items() if v and v[0]["delta"]["phases"]}
    if not groups:
        return
    n_phases = len(next(iter(groups.values()))[0]["delta"]["phases"])
    fig, axes = plt.subplots(1, n_phases, figsize=(4.2 * n_phases, 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    e = np.asarray(edges)
    centres = np.concatenate([[e[0] - 0.125], (e[:-1] + e[1:]) / 2, [e[-1] + 0.125]])
    for k, ax in enumerate(axes):
        for label, runs in groups.items():
            counts = np.sum([r["delta"]["phases"][k]["counts"] for r in runs], axis=0).astype(float)
            ax.step(centres, counts / max(counts.sum(), 1.0), where="mid", label=label)
        lo, hi = runs[0]["delta"]["phases"][k]["steps"]
        ax.set_title(f"steps {lo}-{hi}", fontsize=9)
        ax.axvspan(-1, 1, color="gray", alpha=0.1)
        ax.set_xlabel("n * delta (n = 6; the end bins hold all beyond ±4); shaded: |n delta| < 1", fontsize=8)
    axes[0].set_ylabel("share of images")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def divergence_figure(path: Path, groups: dict[str, Runs]) -> None:
    """Reference divergence D (pred_mse units) of the reference-updating ablation rows over training."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drew = False
    for label, runs in groups.items():
        for i, r in enumerate(runs):
            pts = r["train"].get("ref_divergence") or []
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker=".", lw=0.8, label=label if i == 0 else None)
                drew = True
    if not drew:
        plt.close(fig)
        return
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("divergence from the reference (probe pred_mse)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_figure(path: Path, wt: dict, world: str, task: str) -> None:
    """Hidden reward against drift from the base (mean RMS pixel distance of same-seed images): every sweep
    point of each method (small), its upper-left frontier (line), the main and ablation arms with their 95%
    hierarchical intervals (large), so a method that gains reward by losing the base's images shows it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rec in (wt.get("selection") or {"methods": {}})["methods"].items():
        pts = sorted((g["drift"], g["reward"]) for g in rec["grid"])
        (dots,) = ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "o", ms=3, alpha=0.5, label=f"sweep: {method}"
        )
        best, front = -np.inf, []
        for d, r in pts:  # the points no lower-drift point beats on reward
            if r > best:
                best = r
                front.append((d, r))
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=dots.get_color(), lw=0.8)
    for group, marker in (("arms", "s"), ("ablation", "^")):
        for method, a in wt.get(group, {}).items():
            m, lo, hi = a["reward"]
            ax.errorbar(a["drift"], m, yerr=[[m - lo], [hi - m]], fmt=marker, ms=6, capsize=2, label=method)
    ax.set_xlabel("drift from the base's same-seed images (RMS, pixels in [0, 1])")
    ax.set_ylabel("mean hidden reward of the task")
    ax.set_title(f"reward vs drift: {world} world, {task} task")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
