"""`xdpo check-data`: decode every image of a config's data (a progress bar) and list the bad rows, before a
GPU run finds them hours in. Exit status 2 when a real run would stop (`data.on_bad_row=error`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-data",
        help="decode every image of the config's data; list the bad rows",
        description=(
            "Read the data of a training config as `xdpo train` would (data.path, split, columns, format), "
            "check every row's label and caption and decode every image; list each bad row with its "
            "problem. Exit status 2 when a run with this config would stop on one (data.on_bad_row=error)."
        ),
    )
    p.add_argument("--config", help="YAML config file (the keys of `xdpo train`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.path=...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xdpo.config import load_config
    from xdpo.errors import ConfigError
    from xdpo.train.dryrun import STOPS, check_data

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.path:
        raise ConfigError("data.path: required (the data to check)")
    problems, report = check_data(cfg, decode_images=True)
    if report is None:
        raise ConfigError(problems[0])
    for row in report.bad_rows:
        print(f"  bad row {row}: {report.bad[row]}")
    print(f"{len(report.bad)} bad row(s) of {report.n_rows}")
    if problems:
        print(f"A run would stop on them: {problems[0]}")
        return STOPS
    return 0
