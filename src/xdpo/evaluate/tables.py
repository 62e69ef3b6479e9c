"""The papers' tables from several sample folders: xDPO Table 2 and Kang et al. Table 1 shapes.

`compare_folders([(name, folder), ...], scorers, baselines=[...], out=DIR)` loads every scorer
once, scores every folder (scores cached per folder, see evaluate.py) and writes to `out`:
- `table2.md`, `table2.csv`: the mean of each scorer per (model, prompt set) — xDPO Table 2;
  `table2_long.csv` adds n, the 95% bootstrap interval and, for the HPSv2 benchmark, per-style rows.
- `winrates.md`, `winrates.csv`: the win rate of each model against each baseline on the same
  (prompt, seed) pairs (ties count 0.5), per scorer, and their average over scorers — Kang et al.
  Table 1; `winrates_long.csv` adds wins/ties/losses, n matched and the paired-bootstrap interval.
- `table2.png`, `winrates.png`: bar plots; `compare.json`: all of it with each scorer's details.
A model may have one folder per prompt set (the same name given with each folder); the prompt set
is read from the folder's manifest (`prompt_set`, written by `xdpo sample`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xdpo.errors import ConfigError
from xdpo.evaluate.evaluate import match_keys, score_folder
from xdpo.evaluate.prompts import split_spec
from xdpo.evaluate.sample import read_manifest
from xdpo.evaluate.scorers import Scorer, load_scorers
from xdpo.evaluate.stats import N_RESAMPLES, keyed_scores, summarize, win_rate


def prompt_set_label(row: dict[str, Any]) -> str:
    """A short name for a folder's prompt set: the set's name ("parti" for "parti:/x.tsv"), or a file stem."""
    spec = row.get("prompt_set")
    if not spec:
        return "prompts"
    named = split_spec(str(spec))
    return named[0] if named else Path(str(spec)).stem


def parse_models(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """["NAME=DIR", "DIR", ...] -> [(name, folder)]; a bare DIR is named after the folder."""
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        if not name or not folder:
            raise ConfigError(f"model {spec!r}: expected NAME=DIR or DIR")
        out.append((name, Path(folder)))
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _markdown(df: pd.DataFrame, formats: dict[str, Any]) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(formats.get(c, str)(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _bar_plot(
    path: Path,
    panels: list[tuple[str, list[str], dict[str, list[float]], Any]],
    ylabel: str,
    ylim: Any = None,
) -> None:
    """One panel per (title, groups, {series: values}, (error bars or None, reference line or None))."""
    from matplotlib.figure import Figure

    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    for i, (title, groups, series, (errors, ref)) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(groups))
        for j, (label, values) in enumerate(series.items()):
            yerr = None if errors is None else np.array(errors[label]).T
            ax.bar(x + (j - (len(series) - 1) / 2) * width, values, width, yerr=yerr, label=label, capsize=2)
        if ref is not None:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(x, groups, rotation=20 if max(map(len, groups)) > 8 else 0)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if i == 0:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def table2(scores: dict[tuple[str, str], pd.DataFrame], scorers: list[str], *, n_resamples: int, seed: int):
    """(wide table, long table): mean per (model, prompt set) and scorer; long adds CIs and styles."""
    wide, long = [], []
    for (model, pset), df in scores.items():
        wide.append({"model": model, "prompt_set": pset} | {s: float(df[s].mean()) for s in scorers})
        groups = [(None, df)] + (
            [(st, g) for st, g in df.groupby("style", sort=False)] if "style" in df else []
        )
        for style, g in groups:
            for s in scorers:
                r = summarize(g[s], n_resamples=n_resamples, seed=seed)
                long.append(
                    {"model": model, "prompt_set": pset, "style": style or "all", "scorer": s, "n": r["n"]}
                    | {"mean": r["mean"], "ci_low": r["ci95"][0], "ci_high": r["ci95"][1]}
                )
    return pd.DataFrame(wide), pd.DataFrame(long)


def win_table(
    scores: dict[tuple[str, str], pd.DataFrame],
    scorers: list[str],
    baselines: list[str],
    *,
    n_resamples: int,
    seed: int,
):
    """(wide, long): win rate of every non-baseline model vs every baseline, per prompt set and scorer."""
    wide, long = [], []
    for (model, pset), df in scores.items():
        if model in baselines:
            continue
        for base in baselines:
            if (base, pset) not in scores:
                continue
            bdf = scores[(base, pset)]
            row: dict[str, Any] = {"model": model, "baseline": base, "prompt_set": pset}
            for s in scorers:
                a = keyed_scores(df["key"], df[s], what=f"{model} ({pset})")
                b = keyed_scores(bdf["key"], bdf[s], what=f"{base} ({pset})")
                w = win_rate(a, b, n_resamples=n_resamples, seed=seed)
                row[s] = w["win_rate"]
                long.append(
                    {"model": model, "baseline": base, "prompt_set": pset, "scorer": s}
                    | {k: w[k] for k in ("win_rate", "wins", "ties", "losses", "n_matched", "mean_diff")}
                    | {"ci_low": w["ci95"][0], "ci_high": w["ci95"][1]}
                )
            row["average"] = float(np.mean([row[s] for s in scorers]))
            row["n_matched"] = long[-1]["n_matched"]
            wide.append(row)
    return pd.DataFrame(wide), pd.DataFrame(long)


def compare_folders(
    models: Sequence[tuple[str, str | Path]],
    scorers: str | Sequence[str | Scorer],
    *,
    out: str | Path,
    baselines: Sequence[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    reuse: bool = True,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the folders and write Table 2 and win-rate tables (module docstring); return them as a dict.

    `baselines`: model names to compare against (default: the first model).
    """
    if not models:
        raise ConfigError("compare: no sample folders given")
    folders: dict[tuple[str, str], tuple[Path, list[dict[str, Any]]]] = {}
    for name, folder in models:
        rows = read_manifest(folder)  # fail early, before loading scorer models
        key = (name, prompt_set_label(rows[0]))
        if key in folders:
            raise ConfigError(f"compare: two folders for model {name!r} on prompt set {key[1]!r}")
        folders[key] = (Path(folder), rows)
    names = list(dict.fromkeys(name for name, _ in models))
    baselines = list(baselines) if baselines else names[:1]
    if unknown := [b for b in baselines if b not in names]:
        raise ConfigError(f"compare: baseline {unknown[0]!r} is not a model name ({', '.join(names)})")
    loaded = load_scorers(scorers, device=device, options=options)
    cols = [s.name for s in loaded]
    scores: dict[tuple[str, str], pd.DataFrame] = {}
    for key, (folder, rows) in folders.items():
        df = score_folder(folder, loaded, batch_size=batch_size, reuse=reuse, progress=progress)
        df = df.assign(key=match_keys(rows))
        if any("style" in r for r in rows):
            df = df.assign(style=[r.get("style") for r in rows])
        scores[key] = df

    kw = {"n_resamples": n_resamples, "seed": seed}
    t2, t2_long = table2(scores, cols, **kw)
    wr, wr_long = win_table(scores, cols, baselines, **kw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    details = {s.name: s.details for s in loaded}
    notes = "\n".join(f"- `{k}`: {v}" for k, v in details.items())
    t2.to_csv(out / "table2.csv", index=False)
    t2_long.to_csv(out / "table2_long.csv", index=False)
    md = [
        "# Mean scores per model and prompt set (xDPO Table 2 shape)",
        "",
        _markdown(t2, dict.fromkeys(cols, _fmt)),
    ]
    md += ["", "Scorers:", notes, ""]
    (out / "table2.md").write_text("\n".join(md))
    files = {
        "table2_md": out / "table2.md",
        "table2_csv": out / "table2.csv",
        "table2_long": out / "table2_long.csv",
    }
    if len(wr):
        wr.to_csv(out / "winrates.csv", index=False)
        wr_long.to_csv(out / "winrates_long.csv", index=False)
        pct = dict.fromkeys([*cols, "average"], lambda x: f"{100 * x:.1f}")
        md = ["# Same-seed win rates against each baseline, % (Kang et al. Table 1 shape)", ""]
        md += [
            _markdown(wr, pct),
            "",
            "Win rate: share of (prompt, seed) pairs where the model scores higher ",
        ]
        md[-1] += "than the baseline; ties count 0.5; average = mean over the scorers."
        (out / "winrates.md").write_text("\n".join(md + ["", "Scorers:", notes, ""]))
        files |= {"winrates_md": out / "winrates.md", "winrates_csv": out / "winrates.csv"}
        files["winrates_long"] = out / "winrates_long.csv"
    if plots:
        files |= _plots(out, t2_long, wr_long, cols, names)
    result = {
        "scorers": details,
        "baselines": baselines,
        "folders": {f"{m} ({p})": str(f) for (m, p), (f, _) in folders.items()},
        "table2": t2.to_dict("records"),
        "table2_long": t2_long.to_dict("records"),
        "winrates": wr.to_dict("records"),
        "winrates_long": wr_long.to_dict("records"),
        "files": {k: str(v) for k, v in files.items()},
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    return result


def _plots(out: Path, t2_long: pd.DataFrame, wr_long: pd.DataFrame, cols: list[str], names: list[str]):
    """table2.png (one panel per scorer) and winrates.png (one panel per baseline and prompt set)."""
    files = {}
    overall = t2_long[t2_long["style"] == "all"]
    sets = list(dict.fromkeys(overall["prompt_set"]))
    panels = []
    for s in cols:
        d = overall[overall["scorer"] == s]
        series, errors = {}, {}
        for m in names:
            rows = [d[(d["model"] == m) & (d["prompt_set"] == p)] for p in sets]
            series[m] = [float(r["mean"].iloc[0]) if len(r) else np.nan for r in rows]
            errors[m] = [
                (
                    float(r["mean"].iloc[0] - r["ci_low"].iloc[0]),
                    float(r["ci_high"].iloc[0] - r["mean"].iloc[0]),
                )
                if len(r)
                else (0.0, 0.0)
                for r in rows
            ]
        panels.append((s, sets, series, (errors, None)))
    _bar_plot(out / "table2.png", panels, "mean score")
    files["table2_png"] = out / "table2.png"
    if len(wr_long):
        panels = []
        for (base, pset), d in wr_long.groupby(["baseline", "prompt_set"], sort=False):
            series = {}
            for m in dict.fromkeys(d["model"]):
                rates = [float(d[(d["model"] == m) & (d["scorer"] == s)]["win_rate"].iloc[0]) for s in cols]
                series[m] = [*rates, float(np.mean(rates))]
            panels.append((f"vs {base} ({pset})", [*cols, "average"], series, (None, 0.5)))
        _bar_plot(out / "winrates.png", panels, "win rate", ylim=(0, 1))
        files["winrates_png"] = out / "winrates.png"
    return files
