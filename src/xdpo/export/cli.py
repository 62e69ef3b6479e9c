"""`xdpo export RUN`: a run's final model (or best/) as LoRA files for UIs and diffusers, merged whole
weights, a model card, and optionally the hub.

Into `--out` (default RUN/export, RUN/export-best for best/): README.md (the model card, `xdpo.train.card`), and for a LoRA run
`pytorch_lora_weights.safetensors` (diffusers/peft), `<run>_kohya.safetensors` (kohya/ComfyUI naming with
alpha; SD, SDXL, Flux; text-encoder LoRA as lora_te_ / lora_te1_ / lora_te2_) and `merged/` (the LoRA fused into the base pipeline); for a full fine-tune
`merged/` is final/'s pipeline itself. `--push-to-hub REPO` uploads the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError

FORMATS = ("diffusers", "kohya", "merged")


def locate(source: Path) -> tuple[Path, Path]:
    """(the model folder with xdpo.json, the run folder with config.yaml) for a run, its final/ or best/."""
    model = source if (source / "xdpo.json").is_file() else source / "final"
    if not (model / "xdpo.json").is_file():
        raise ConfigError(f"export: {source} is neither a run folder with final/ nor a final/ (no xdpo.json)")
    run = model.parent
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"export: {run} has no config.yaml (the run's config, written by `xdpo train`)")
    return model, run


def export(source: Path, out: Path | None = None, formats: tuple[str, ...] = FORMATS,
           license: str | None = None, say: Any = print) -> Path:  # fmt: skip
    """Write the export folder (module docstring); return it."""
    from xdpo.config import load_config
    from xdpo.export import lora
    from xdpo.models.families import get_family
    from xdpo.models.load import pipeline_kwargs
    from xdpo.train.card import write_model_card

    if unknown := sorted(set(formats) - set(FORMATS)):
        raise ConfigError(f"--formats: unknown {unknown[0]!r} (choose from {', '.join(FORMATS)})")
    model, run = locate(Path(source))
    info = json.loads((model / "xdpo.json").read_text())
    cfg = load_config(run / "config.yaml")
    fam = get_family(info["family"])
    out = Path(out or run / ("export" if model.name == "final" else f"export-{model.name}"))
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if info.get("lora"):
        trained_text = list(info.get("text_encoder_lora") or [])  # model.lora_text_encoder's encoders
        state, meta = lora.read_lora(model / lora.LORA_FILE)
        if "diffusers" in formats:
            shutil.copyfile(model / lora.LORA_FILE, out / lora.LORA_FILE)
            files[lora.LORA_FILE] = "diffusers/peft format: `pipe.load_lora_weights(folder or repo)`"
        if "kohya" in formats and fam.name not in lora.KOHYA_PREFIX:
            say(f"kohya: no kohya naming for {fam.name} LoRAs in diffusers; UIs load {lora.LORA_FILE}")
        elif "kohya" in formats:
            from safetensors.torch import save_file

            alpha, rank = cfg.model.lora_alpha or cfg.model.lora_rank, cfg.model.lora_rank
            scale = lora.lora_scale(meta, fam.denoiser, alpha, rank)
            text = {t.component: (t.kohya, lora.lora_scale(meta, t.component, alpha, rank), t.kohya_root)
                    for t in fam.text_lora if t.component in trained_text}  # fmt: skip
            name = f"{run.name}_kohya.safetensors"
            kohya = lora.to_kohya(state, fam.name, fam.denoiser, scale, text)
            save_file(kohya, str(out / name), {"format": "pt"})
            files[name] = "kohya naming with alpha (ComfyUI, AUTOMATIC1111, Forge, InvokeAI: the LoRA folder)"
        if "merged" in formats:
            kw = pipeline_kwargs(cfg.model, fam, cfg.family)
            lora.merge(info["base_model"], model, out / "merged", fam.pipeline_cls(), kw,
                       [fam.denoiser, *trained_text])  # fmt: skip
            files["merged/"] = "the base pipeline with the LoRA fused in: `from_pretrained(folder/merged)`"
    elif "merged" in formats:
        shutil.copytree(model, out / "merged", dirs_exist_ok=True)
        files["merged/"] = "the fine-tuned pipeline: `from_pretrained(folder/merged)`"
    for f in files:
        say(f"wrote {out / f}")
    card = write_model_card(out, cfg, info, run=run, license=license, files=files)
    say(f"wrote {card}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a run's model as LoRA files for UIs (kohya) and diffusers, merged weights, model card, hub",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="a run's output folder (its final/), or a final/ or best/ folder")
    p.add_argument("--out", type=Path, help="export folder (default: RUN/export)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    p.add_argument("--license", help="the model card's license (default: the base model card's)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the export folder to this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    out = export(args.run, args.out, formats, args.license)
    if args.push_to_hub:
        from xdpo.export.hub import push_to_hub

        print(f"pushed {out} to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0
