"""`xdpo` command line: thin parsing that hands over to each command's module.

Each command module exposes `register(subparsers)`; it adds its sub-parser and sets
`func=callable(args) -> int`. Errors derived from `XdpoError` are printed as one line (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xdpo import __version__
from xdpo.errors import XdpoError

COMMAND_MODULES = [
    "xdpo.train.cli",
    "xdpo.train.cache_cli",
    "xdpo.evaluate.cli",
    "xdpo.pairs.cli",
    "xdpo.export.cli",
    "xdpo.apps.digits.cli",
    "xdpo.apps.demo.cli",
    "xdpo.apps.study.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpo",
        description=(
            "Preference fine-tuning of text-to-image diffusion models (xDPO, Diffusion-DPO, SFT, ...). "
            "Run `xdpo COMMAND --help` for each command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"xdpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except XdpoError as e:
        print(f"xdpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the command has said what it saved
        print(f"xdpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
