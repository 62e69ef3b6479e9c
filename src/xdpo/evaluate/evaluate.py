"""Score a sample folder, summarise, and compare with a baseline folder at the same (prompt, seed).

A sample folder's scores are cached in it (`scores.parquet` + `scores.meta.json`, keyed by the
manifest's hash and each scorer's `details`), so a baseline scored once is reused by every
comparison; `sample_images` removes the cache when it rewrites the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.sample import MANIFEST, read_manifest
from xdpo.evaluate.scorers import Scorer, load_scorers, run_scorer
from xdpo.evaluate.stats import N_RESAMPLES, keyed_scores, summarize, win_rate

CACHE = "scores.parquet"
CACHE_META = "scores.meta.json"
KEYS = ("prompt", "seed", "file")
SETTINGS = ("model", "lora", "steps", "guidance", "scheduler", "height", "width")


def _manifest_hash(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def _load_cache(folder: Path, digest: str) -> tuple[pd.DataFrame | None, dict[str, str]]:
    """The cached table and its scorer details; (None, {}) if absent or stale."""
    try:
        meta = json.loads((folder / CACHE_META).read_text())
        if meta.get("manifest_sha256") != digest:
            return None, {}
        table = pd.read_parquet(folder / CACHE)
    except (OSError, ValueError):
        return None, {}
    details = {k: v for k, v in meta.get("scorers", {}).items() if k in table}
    return table[list(KEYS) + list(details)], details


def _write_cache(folder: Path, digest: str, table: pd.DataFrame, details: dict[str, str]) -> None:
    try:
        table.to_parquet(folder / CACHE, index=False)
        meta = {"manifest_sha256": digest, "scorers": details}
        (folder / CACHE_META).write_text(json.dumps(meta, indent=2))
    except OSError:  # a read-only folder: simply no cache
        pass


def _load_image(folder: Path, row: dict[str, Any], line: int) -> Image.Image:
    path = folder / row["file"]
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / MANIFEST}: line {line}: cannot read image {path} ({e})") from None


def score_folder(
    folder: str | Path,
    scorers: str | Sequence[str | Scorer],
    *,
    batch_size: int | None = None,
    reuse: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-image scores of a sample folder: columns prompt, seed, file, then one per scorer.

    `scorers`: loaded Scorer objects (load once, reuse across folders) or names.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    rows = read_manifest(folder)
    scorers = load_scorers(scorers)
    for s in scorers:
        if s.name in KEYS:
            raise ConfigError(f"scorer name {s.name!r} clashes with a manifest column")
    digest = _manifest_hash(folder)
    base = pd.DataFrame({k: [r[k] for r in rows] for k in KEYS})
    table, details = _load_cache(folder, digest)
    if table is None or len(table) != len(base):
        table, details = base, {}
    stale = [s.name for s in scorers if s.name in table and (not reuse or details[s.name] != s.details)]
    table = table.drop(columns=stale)
    todo = [s for s in scorers if s.name not in table]
    if todo:
        bs = batch_size or min(int(getattr(s, "batch_size", 64)) for s in todo)
        columns: dict[str, list[np.ndarray]] = {s.name: [] for s in todo}
        starts = range(0, len(rows), bs)
        for start in tqdm(starts, desc=f"scoring {folder.name}", unit="batch", disable=not progress):
            chunk = rows[start : start + bs]
            images = [_load_image(folder, r, start + i + 1) for i, r in enumerate(chunk)]
            prompts = [r["prompt"] for r in chunk]
            for s in todo:
                where = f"({folder / MANIFEST}, rows {start + 1}-{start + len(chunk)})"
                columns[s.name].append(run_scorer(s, images, prompts, where=where))
        table = table.assign(**{name: np.concatenate(parts) for name, parts in columns.items()})
        details = {k: v for k, v in details.items() if k in table} | {s.name: s.details for s in todo}
        _write_cache(folder, digest, table, details)
    return table[list(KEYS) + [s.name for s in scorers]]


def match_keys(rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Same-seed matching keys of manifest rows: (style, prompt, seed, k).

    `style` is None outside the HPSv2 benchmark; k numbers repeats of a (style, prompt, seed) in
    manifest order (0 when unique), since a benchmark list may hold a prompt twice.
    """
    seen: dict[tuple[Any, ...], int] = {}
    keys = []
    for r in rows:
        base = (r.get("style"), r["prompt"], r["seed"])
        seen[base] = seen.get(base, -1) + 1
        keys.append((*base, seen[base]))
    return keys


def _settings(folder: Path) -> dict[str, Any]:
    row = read_manifest(folder)[0]
    return {k: row.get(k) for k in SETTINGS}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (one row per scorer)."""
    has_base = summary.get("baseline") is not None
    s = summary["settings"]
    lines = [
        f"# Evaluation of `{summary['images']}`",
        "",
        f"{summary['n_images']} images; model `{s.get('model')}`"
        + (f" + LoRA `{s['lora']}`" if s.get("lora") else "")
        + f"; {s.get('steps')} steps, guidance {s.get('guidance')}, scheduler {s.get('scheduler')}.",
    ]
    if has_base:
        lines += [
            "",
            f"Baseline: `{summary['baseline']}` ({summary['n_baseline']} images), matched by (prompt, seed).",
        ]
    header = ["scorer", "mean", "median", "95% CI"]
    if has_base:
        header += ["baseline mean", "win rate vs baseline", "win-rate 95% CI", "n matched"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in summary["scorers"].items():
        cells = [name, _fmt(r["mean"]), _fmt(r["median"]), f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]"]
        if has_base:
            w = r["vs_baseline"]
            cells += [_fmt(r["baseline"]["mean"]), _fmt(w["win_rate"])]
            cells += [f"[{_fmt(w['ci95'][0])}, {_fmt(w['ci95'][1])}]", str(w["n_matched"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = "Intervals: 95% percentile bootstrap of the mean"
    note += " and of the win rate over matched pairs; ties count 0.5." if has_base else "."
    lines += ["", note, ""]
    return "\n".join(lines)


def evaluate_folder(
    images_dir: str | Path,
    scorers: str | Sequence[str | Scorer],
    baseline: str | Path | None = None,
    out: str | Path | None = None,
    *,
    fmt: str = "parquet",
    batch_size: int | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    reuse: bool = True,
    device: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `images_dir` (and `baseline`), write scores + summary.json + summary.md to `out`.

    `out` defaults to `images_dir`; `options` are the scorers' options (e.g. weights; see
    `load_scorers`). Returns the summary: per scorer n, mean, median, std, ci95, and with a
    baseline its summary under "baseline" and the same-seed win rate under "vs_baseline".
    """
    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"format: {fmt!r} is not parquet or csv")
    images_dir = Path(images_dir)
    out_dir = Path(out) if out is not None else images_dir
    read_manifest(images_dir)  # fail early, before loading scorer models
    if baseline is not None:
        read_manifest(baseline)
    loaded = load_scorers(scorers, device=device, options=options)
    kw = {"batch_size": batch_size, "reuse": reuse, "progress": progress}
    table = score_folder(images_dir, loaded, **kw)
    base_table = score_folder(baseline, loaded, **kw) if baseline is not None else None

    summary: dict[str, Any] = {
        "images": str(images_dir),
        "baseline": str(baseline) if baseline is not None else None,
        "n_images": len(table),
        "n_baseline": len(base_table) if base_table is not None else None,
        "settings": _settings(images_dir),
        "baseline_settings": _settings(Path(baseline)) if baseline is not None else None,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "scorers": {},
    }
    for s in loaded:
        result = {"details": s.details, **summarize(table[s.name], n_resamples=n_resamples, seed=seed)}
        if base_table is not None:
            result["baseline"] = summarize(base_table[s.name], n_resamples=n_resamples, seed=seed)
            a = keyed_scores(match_keys(read_manifest(images_dir)), table[s.name], what=str(images_dir))
            b = keyed_scores(match_keys(read_manifest(baseline)), base_table[s.name], what=str(baseline))
            result["vs_baseline"] = win_rate(a, b, n_resamples=n_resamples, seed=seed)
        summary["scorers"][s.name] = result

    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path = out_dir / f"scores.{fmt}"
    if fmt == "csv":
        table.to_csv(scores_path, index=False)
    elif scores_path.resolve() != (images_dir / CACHE).resolve():
        table.to_parquet(scores_path, index=False)
    summary["files"] = {
        "scores": str(scores_path),
        "summary_json": str(out_dir / "summary.json"),
        "summary_md": str(out_dir / "summary.md"),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    return summary
