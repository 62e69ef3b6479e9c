"""`xdpo train --dry-run`: validate the config, the data and the model, print what a run would use; write nothing."""

from __future__ import annotations

import yaml

from xdpo.config import Config, to_dict


def dry_run(cfg: Config) -> int:
    """Print the resolved config, the usable pairs (ties, bad rows) and a memory estimate."""
    from xdpo.data import PreferencePairs, load_preference_table
    from xdpo.models.load import check_pipeline
    from xdpo.train.memory import estimate, format_estimate, meta_modules
    from xdpo.train.setup import resolve_timesteps

    fam = check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision)
    resolve_timesteps(cfg, fam.process)
    print("# resolved config")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print(f"\nModel: {fam.name} ({fam.pipeline_class}, {fam.process}); {fam.about}")
    table = load_preference_table(cfg.data.path, cfg.data.split)
    pairs = PreferencePairs(
        table,
        resolution=cfg.data.resolution,
        ties=cfg.data.ties,
        flip=cfg.data.flip,
        random_crop=cfg.data.random_crop,
        prompt_dropout=cfg.data.prompt_dropout,
        source=cfg.data.path,
    )
    usable = min(len(pairs), cfg.data.max_pairs) if cfg.data.max_pairs else len(pairs)
    print(f"Data: {cfg.data.path}: {usable} usable pairs ({pairs.n_ties} ties, {pairs.n_dropped} dropped)")
    report = _validate(table, cfg)
    if report:
        print(report)
    print(format_estimate(estimate(meta_modules(cfg.model.pretrained, fam, cfg), fam.denoiser, cfg)))
    print("Dry run: nothing was written.")
    return 0


def _validate(table, cfg: Config) -> str:
    """The data's up-front validation report (bad rows, duplicates), when the data module provides one."""
    try:
        from xdpo.data import validate_pairs
    except ImportError:
        return ""
    report = validate_pairs(table, source=cfg.data.path, split=cfg.data.split, on_bad_row="skip")
    return f"Validation (images not decoded): {report.summary() if hasattr(report, 'summary') else report}"
