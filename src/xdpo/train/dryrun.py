"""`xdpo train --dry-run`: check the config, the model and the data, print what a run would use, and list
every problem that would stop a real run (exit status 2 when there is one); write nothing.

Each part is checked even when an earlier one failed (the model and the data independently, every key's
range and every component's rules), so one dry run shows all that needs fixing. `--decode-images` (or
`xdpo check-data`) also decodes every image with a progress bar.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xdpo.config import Config, to_dict
from xdpo.errors import XdpoError

STOPS = 2
"""Exit status of a dry run that found a problem a real run would stop on (as any other xdpo error)."""


def load_leniently(path: str | Path | None, overrides: list[str]) -> tuple[Config, list[str]]:
    """The config with every broken range and rule collected instead of raised at the first (unknown keys
    and wrong types still raise: nothing can be checked without them)."""
    from xdpo.config import RULE_OWNERS, iter_fields, parse_override, read_file, value_of
    from xdpo.config.options import resolve
    from xdpo.config.parse import build

    flat: dict[str, Any] = read_file(path) if path is not None else {}
    for o in overrides:
        k, v = parse_override(o)
        flat[k] = v
    cfg = build(flat)
    problems = []
    for key, f, _ in iter_fields(type(cfg)):
        check = f.metadata.get("check")
        if check is not None and not check(value_of(cfg, key)):
            problems.append(f"config key `{key}`: {f.metadata['rule']}, got {value_of(cfg, key)!r}")
    for owner in RULE_OWNERS:
        try:
            resolve(owner)(cfg)
        except XdpoError as e:
            problems.append(str(e))
    return cfg, problems


def check_data(cfg: Config, decode_images: bool) -> tuple[list[str], Any]:
    """(problems, validation report) of `cfg.data`; prints the usable pairs and the bad rows found."""
    from xdpo.data import open_data
    from xdpo.data.entry import open_table
    from xdpo.data.validate import validate_pairs

    d = cfg.data
    skip = copy.deepcopy(cfg)
    skip.data.on_bad_row = "skip"  # report every bad row instead of stopping at the first
    try:
        table = open_table(skip)
        report = validate_pairs(
            table, source=d.path, split=d.split, on_bad_row="skip", progress=True, fmt=d.format,
            columns=d.columns, decode_images=decode_images,
        )  # fmt: skip
        print(f"Validation: {report.summary()}")
        _, items, n = open_data(skip)
    except XdpoError as e:
        return [str(e)], None
    kind = "images" if d.format == "images" else "pairs"
    print(f"Data: {d.path}: {n} usable {kind} ({items.n_ties} ties, {items.n_dropped} dropped)")
    if getattr(items, "bucket_of", None) is not None:
        counts = np.bincount(items.bucket_of, minlength=len(items.buckets))
        print("Buckets (width x height: pairs): " + ", ".join(
            f"{w}x{h}: {int(k)}" for (w, h), k in zip(items.buckets, counts, strict=True) if k))  # fmt: skip
    if not report.ok and d.on_bad_row == "error":
        return [f"data.on_bad_row=error: {report.first_error()}"], report
    return [], report


def dry_run(cfg: Config, problems: list[str] | None = None, *, decode_images: bool = False) -> int:
    """Print the resolved config, the model, the usable pairs (ties, bad rows) and a memory estimate; list
    `problems` (the config's, from `load_leniently`) with those found here. 0 when a run would start."""
    from xdpo.models.load import check_pipeline
    from xdpo.train.setup import resolve_timesteps

    problems = list(problems or [])
    fam = None
    try:
        fam = check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision)
        resolve_timesteps(cfg, fam.process)
    except XdpoError as e:
        problems.append(str(e))
    print("# resolved config")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    if fam is not None:
        print(f"\nModel: {fam.name} ({fam.pipeline_class}, {fam.process}); {fam.about}")
    if cfg.online.enabled:
        print(f"Data: online rounds of {cfg.online.every} steps from {cfg.online.prompts}")
    elif cfg.data.path:
        problems += check_data(cfg, decode_images)[0]
    if fam is not None:
        from xdpo.train.memory import estimate, format_estimate, meta_modules, sharding_from_env

        try:
            modules = meta_modules(cfg.model.pretrained, fam, cfg)
            print(format_estimate(estimate(modules, fam.denoiser, cfg, sharding_from_env())))
        except XdpoError as e:
            problems.append(str(e))
    if problems:
        print(f"\nA real run would stop: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        print("Dry run: nothing was written.")
        return STOPS
    print("Dry run: nothing was written; a real run would start.")
    return 0
