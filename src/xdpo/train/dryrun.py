"""`xdpo train --dry-run`: validate the config, the data and the model, print what a run would use; write nothing."""

from __future__ import annotations

import copy

import yaml

from xdpo.config import Config, to_dict


def dry_run(cfg: Config) -> int:
    """Print the resolved config, the usable pairs (ties, bad rows) and a memory estimate."""
    from xdpo.data import open_data
    from xdpo.data.entry import open_table
    from xdpo.data.validate import validate_pairs
    from xdpo.models.load import check_pipeline
    from xdpo.train.memory import estimate, format_estimate, meta_modules, sharding_from_env
    from xdpo.train.setup import resolve_timesteps

    fam = check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision)
    resolve_timesteps(cfg, fam.process)
    print("# resolved config")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print(f"\nModel: {fam.name} ({fam.pipeline_class}, {fam.process}); {fam.about}")
    d = cfg.data
    if cfg.online.enabled:
        print(f"Data: online rounds of {cfg.online.every} steps from {cfg.online.prompts}")
    else:
        skip = copy.deepcopy(cfg)
        skip.data.on_bad_row = "skip"  # report every bad row instead of stopping at the first
        table = open_table(skip)
        report = validate_pairs(
            table,
            source=d.path,
            split=d.split,
            on_bad_row="skip",
            progress=True,
            fmt=d.format,
            columns=d.columns,
        )
        print(f"Validation (images checked when a step decodes them): {report.summary()}")
        _, items, n = open_data(skip)
        kind = "images" if d.format == "images" else "pairs"
        print(f"Data: {d.path}: {n} usable {kind} ({items.n_ties} ties, {items.n_dropped} dropped)")
        if not report.ok and d.on_bad_row == "error":
            print(f"A run would stop here (data.on_bad_row=error): {report.first_error()}")
    modules = meta_modules(cfg.model.pretrained, fam, cfg)
    print(format_estimate(estimate(modules, fam.denoiser, cfg, sharding_from_env())))
    print("Dry run: nothing was written.")
    return 0
