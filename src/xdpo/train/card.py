"""The model card (README.md) of a trained model: base model, objective, data, hyperparameters, metrics,
validation grid and license, with the hub's metadata header (`huggingface_hub.ModelCardData`).

Written into `final/` (and `best/`) at the end of every run by `checkpoint.save_final`, and by `xdpo export`.
The values come from the run itself: its config, `metrics.jsonl` (the means of the last steps) and
`validation/history.jsonl` (the first and the last validation); the last validation grid is copied next to
the card. The license is the one given, else the base model's card's (a local folder's README.md or the
hub cache's), else `other` with a line saying it was not determined.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from xdpo.train.validation import FOLDER, HISTORY

CARD = "README.md"
GRID = "validation-grid.png"
LAST_STEPS = 50  # the metrics' means are over the run's last steps


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def base_license(base: str) -> str | None:
    """The license in the base model's card, read without the network (a folder, or the hub cache)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    path = Path(base) / CARD
    if not path.is_file() and base.count("/") == 1 and not Path(base).exists():
        cached = try_to_load_from_cache(base, CARD)
        path = Path(cached) if isinstance(cached, str) else path
    try:
        return ModelCard.load(path).data.license if path.is_file() else None
    except Exception:  # a README without a metadata header, or an unreadable one: no license known
        return None


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def hyperparameters(cfg: Any) -> dict[str, Any]:
    m, t, lo, ts = cfg.model, cfg.train, cfg.loss, cfg.timesteps
    found = {
        "objective": lo.objective, "divergence": lo.divergence, "outer loss": lo.outer, "loss.beta": lo.beta,
        "learning rate": t.learning_rate, "scale_lr": t.scale_lr, "warmup steps": t.warmup_steps,
        "batch size (pairs per device)": t.batch_size, "gradient accumulation": t.grad_accum,
        "max steps": t.max_steps, "optimizer": t.optimizer, "mixed precision": t.mixed_precision,
        "LoRA rank": m.lora_rank or "full fine-tune", "timesteps": f"{ts.sampling}, weighting {ts.weighting}",
        "reference": cfg.reference.strategy, "resolution": cfg.data.resolution, "seed": cfg.seed,
    }  # fmt: skip
    if m.lora_rank:
        found["LoRA alpha"] = m.lora_alpha or m.lora_rank
        found["LoRA targets"] = ", ".join(m.lora_targets)
    if m.lora_text_encoder:
        found["LoRA on the text encoders, lr"] = m.lora_text_encoder_lr or t.learning_rate
    if getattr(cfg, "sections", None):
        found |= {f"{name}.{k}": v for name, sec in cfg.sections.items() if name == lo.objective
                  for k, v in vars(sec).items()}  # fmt: skip
    return found


def data_line(cfg: Any) -> str:
    o = cfg.online
    if o.enabled:
        return (f"online rounds: {o.per_prompt} images per prompt of `{o.prompts}` sampled from the policy every "
                f"{o.every} steps, scored by `{o.scorer}`")  # fmt: skip
    return (
        f"`{cfg.data.path}` (format {cfg.data.format}{', split ' + cfg.data.split if cfg.data.split else ''})"
    )


def metrics_lines(run: Path) -> list[str]:
    rows = [r for r in _rows(run / "metrics.jsonl") if "implicit_acc" in r]
    if not rows:
        return ["No training metrics were found (metrics.jsonl)."]
    last = rows[-LAST_STEPS:]
    keys = ["loss", "implicit_acc", "reward_margin", "beta_eff"]
    keys += sorted(k for k in last[-1] if k.startswith(("implicit_acc_t", "reward_margin_t")))
    out = [f"Means over the last {len(last)} of {rows[-1]['step']} steps (`metrics.jsonl`):", "",
           "| metric | value |", "| --- | --- |"]  # fmt: skip
    for k in keys:
        vals = [r[k] for r in last if isinstance(r.get(k), int | float)]
        if vals:
            out.append(f"| {k} | {sum(vals) / len(vals):.4g} |")
    out.append(f"| pairs seen | {rows[-1].get('pairs_seen')} |")
    if "epoch" in rows[-1]:
        out.append(f"| passes over the data | {rows[-1]['epoch']:.3g} |")
    return out


def validation_lines(run: Path, final: Path) -> list[str]:
    rows = _rows(run / FOLDER / HISTORY)
    if not rows:
        return ["No validation during training (set `validation.prompts`)."]
    first, last = rows[0], rows[-1]
    out = ["| | " + " | ".join(f"step {r['step']}" for r in (first, last)) + " |", "| --- | --- | --- |"]
    names = sorted(set(first.get("scores", {})) | set(last.get("scores", {})))
    for k in names:
        out.append(
            f"| {k} | "
            + " | ".join(f"{r.get('scores', {}).get(k, float('nan')):.4g}" for r in (first, last))
            + " |"
        )
    for k in ("diversity", "drift"):
        vals = [r.get(k) for r in (first, last)]
        out.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    grid = run / last["grid"]
    if grid.is_file():
        shutil.copyfile(grid, final / GRID)
        out += ["", f"Validation images at step {last['step']} (a row per prompt, a column per seed):", "",
                f"![validation grid]({GRID})"]  # fmt: skip
    return out


def usage(base: str, pipeline_class: str, lora: bool) -> str:
    if lora:
        return (f"```python\nfrom diffusers import {pipeline_class}\n\npipe = {pipeline_class}.from_pretrained("
                f"\"{base}\")\npipe.load_lora_weights(\"PATH_OR_REPO\")\n```")  # fmt: skip
    return f'```python\nfrom diffusers import {pipeline_class}\n\npipe = {pipeline_class}.from_pretrained("PATH_OR_REPO")\n```'


def write_model_card(final: Path, cfg: Any, info: dict[str, Any], run: Path | None = None,
                     license: str | None = None, files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """README.md in `final` for the model described by `info` (final's xdpo.json) trained with `cfg`;
    `run`: the run's output folder (default: final's parent); `files`: {file: what it is} to list."""
    from huggingface_hub import ModelCard, ModelCardData

    from xdpo.objectives import get_objective

    final, run = Path(final), Path(run or Path(final).parent)
    base, lora = str(cfg.model.pretrained), bool(info.get("lora"))
    found = license or base_license(str(info.get("base_model", base)))
    tags = ["xdpo", "diffusers", "text-to-image", f"xdpo-{cfg.loss.objective}"] + (["lora"] if lora else [])
    data = ModelCardData(
        license=found or "other", base_model=base if is_hub_id(base) else None, library_name="diffusers",
        pipeline_tag="text-to-image", tags=tags,
    )  # fmt: skip
    lines = [
        f"# {run.name}",
        "",
        f"{'LoRA' if lora else 'Full'} fine-tune of `{base}` ({info.get('family')}, {info.get('pipeline_class')}) "
        f"with xdpo for {info.get('step')} steps: "
        f"{get_objective(cfg.loss.objective).about}.",
        "",
        f"- **Base model**: `{base}`" + (f" (with VAE `{cfg.model.vae}`)" if cfg.model.vae else ""),
        f"- **Objective**: `{cfg.loss.objective}` (divergence `{cfg.loss.divergence}`, outer `{cfg.loss.outer}`)",
        f"- **Data**: {data_line(cfg)}",
        f"- **License**: {found or 'other (not determined: the base model card names none; set it with `xdpo export --license ID`)'}",
        "",
        "## Hyperparameters",
        "",
        "| key | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in hyperparameters(cfg).items()],
        "",
        "## Metrics",
        "",
        *metrics_lines(run),
        "",
        "## Validation",
        "",
        *validation_lines(run, final),
        "",
        *(["## Files", "", *[f"- `{k}`: {v}" for k, v in files.items()], ""] if files else []),
        "## Usage",
        "",
        usage(base if is_hub_id(base) else "BASE_MODEL", str(info.get("pipeline_class")), lora),
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = final / CARD
    card.save(path)
    return path
