"""`report.html` of a run: the validation grids side by side over training and the reward curves.

One self-contained page (opens from the file system, no server): the curves are a matplotlib PNG embedded
as a data URI; the grids are linked by their paths relative to the output folder (`validation/grid-*.png`).
Curves: each validation scorer's mean reward and the held-out reward per validation, the monitors
(diversity across seeds, drift from step 0), and the training's implicit accuracy and reward margin from
`metrics.jsonl` (a running mean over 10 steps).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

REPORT = "report.html"


def _running_mean(values: list[float], k: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def _training_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
    return rows


def curves_png(rows: list[dict[str, Any]], training: list[dict[str, Any]], held_out: str = "") -> bytes:
    """The curves as one PNG (three panels: rewards, monitors, training's accuracy and margin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in rows]
    for name in sorted({k for r in rows for k in r.get("scores", {})}):
        label = f"{name} (held out)" if name == held_out else name
        axes[0].plot(steps, [r["scores"].get(name) for r in rows], "o-", label=label)
    axes[0].set(title="validation rewards (mean)", xlabel="step")
    for key in ("diversity", "drift"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), "o-", label=key)
    axes[1].set(title="monitors (pixel RMS, 0..1)", xlabel="step")
    if training:
        t_steps = [r["step"] for r in training]
        axes[2].plot(t_steps, _running_mean([r["implicit_acc"] for r in training]), label="implicit_acc")
        twin = axes[2].twinx()
        twin.plot(t_steps, _running_mean([r["reward_margin"] for r in training]), color="C1", label="margin")
        twin.set_ylabel("reward_margin")
        twin.legend(loc="lower right")
    axes[2].set(title="training (running mean of 10 steps)", xlabel="step", ylabel="implicit_acc")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, rows: list[dict[str, Any]], prompts: list[str], seeds: list[int],
                 held_out: str = "") -> Path:  # fmt: skip
    """Write `out/report.html` from the validation rows (`validation/history.jsonl`'s) and metrics.jsonl."""
    out = Path(out)
    png = base64.b64encode(curves_png(rows, _training_rows(out), held_out)).decode()
    cells = []
    for r in rows:
        lines = [f"step {r['step']}" + (" (base model)" if r["step"] == 0 else "")]
        lines += [f"{k}: {v:.4g}" for k, v in r.get("scores", {}).items()]
        lines += [f"{k}: {r[k]:.3f}" for k in ("diversity", "drift") if r.get(k) is not None]
        caption = "<br>".join(html.escape(line) for line in lines)
        cells.append(
            f'<figure><a href="{html.escape(r["grid"])}"><img src="{html.escape(r["grid"])}"></a>'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    rows_note = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>xdpo run: {html.escape(out.name)}</title>
<style>body{{font-family:sans-serif;margin:1em}} .grids{{display:flex;gap:12px;overflow-x:auto}}
figure{{margin:0}} figure img{{width:256px;image-rendering:pixelated}} figcaption{{font-size:12px}}</style>
</head><body>
<h1>{html.escape(out.name)}</h1>
<h2>Rewards and monitors</h2>
<img alt="curves" src="data:image/png;base64,{png}">
<h2>Validation images over training</h2>
<p>Each grid: one row per prompt, one column per seed ({", ".join(map(str, seeds))}); the same seeds at every
step, so a column shows how one image changes.</p>
<div class="grids">{"".join(cells)}</div>
<h3>Prompts (rows, top to bottom)</h3><ol start="0">{rows_note}</ol>
</body></html>
"""
    path = out / REPORT
    path.write_text(page, encoding="utf-8")
    return path
