"""`xdpo` command line: thin parsing that hands over to each command's module.

Each command module exposes `register(subparsers)`; it adds its sub-parser(s) and sets
`func=callable(args) -> int`. Only the module of the command being run is imported (`COMMANDS`): `xdpo
--help` and `xdpo COMMAND --help` of a light command answer without importing torch. Errors derived from
`XdpoError` are printed as one line (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xdpo import __version__
from xdpo.errors import XdpoError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("xdpo.train.cli", "fine-tune a diffusion model on preference pairs"),
    "check-data": ("xdpo.train.check_data", "decode every image of the config's data; list the bad rows"),
    "cache": ("xdpo.train.cache_cli", "encode the training pairs' latents and captions once (data.cache)"),
    "sample": ("xdpo.evaluate.cli", "sample images for prompts x seeds (images + manifest.jsonl)"),
    "evaluate": ("xdpo.evaluate.cli", "score a sample folder; summary, bootstrap intervals, same-seed win rates"),
    "compare": ("xdpo.evaluate.cli", "tables of several models: mean scores, win rates vs baselines"),
    "pairs": ("xdpo.pairs.cli", "sample K images per prompt, score them with a reward model, write preference pairs"),
    "relabel": ("xdpo.pairs.cli", "replace a preference table's labels with a reward model's (AI feedback)"),
    "export": ("xdpo.export.cli", "a run's LoRA in the formats UIs load (kohya, diffusers), merged weights, model card"),
    "digits": ("xdpo.apps.digits.cli", "the built-in digits world: shipped base model, rebuild recipe, labelled pairs"),
    "demo": ("xdpo.apps.demo.cli", "the digits world end to end: pairs, Diffusion-DPO vs xDPO, evaluation, report"),
    "study": ("xdpo.apps.study.cli", "a fair multi-seed study in both digits worlds: sweeps, 3 seeds, Kang ablation"),
}  # fmt: skip
"""Command -> (the module that registers it, its one-line help for `xdpo --help`)."""

COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def chosen_command(argv: list[str]) -> str | None:
    """The command named in `argv` (its first word that is not an option), None when there is none."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: `command`'s module is imported and registers its sub-parsers; every other command is a
    placeholder carrying its help line."""
    parser = argparse.ArgumentParser(
        prog="xdpo",
        description=(
            "Preference fine-tuning of text-to-image diffusion models (xDPO, Diffusion-DPO, SFT, ...). "
            "Run `xdpo COMMAND --help` for each command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"xdpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded = COMMANDS[command][0] if command else None
    for name, (module, help_line) in COMMANDS.items():
        if module != loaded:  # the loaded module registers its own commands
            sub.add_parser(name, help=help_line)
    if loaded is not None:
        importlib.import_module(loaded).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(chosen_command(argv))
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
