"""Prompt lists and seed lists for sampling.

`resolve_prompts(spec)` accepts a named set (registered by plugins, see plugins.py: the papers'
`parti`, `hpsv2`, `pickapic-test` from prompt_sets.py, the digits world's `digits`; more through
`register_prompt_set`), a named set with a local source `NAME:PATH` (e.g.
`parti:/data/PartiPrompts.tsv`), or a file: `.txt` (one prompt per line), `.tsv`, `.csv`, `.json`,
`.jsonl` or `.parquet` with a `prompt` (or `caption`) column, any case.
`resolve_prompt_records(spec)` keeps what a set knows beyond the text (the HPSv2 benchmark's `style`
and `prompt_index`, the position in its style's list).
`parse_seeds(spec)` accepts "0,1,2", "0-4" (inclusive), "n:5" (= 0-4), or a mix "0-2,10".
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.plugins import load_plugins

PROMPT_COLUMNS = ("prompt", "caption")

# name -> function returning the prompts (strings or records with a "prompt" key), loaded lazily:
# `loader()` for `--prompts NAME`, `loader(source)` for `--prompts NAME:SOURCE`.
PROMPT_SETS: dict[str, Callable[..., list[Any]]] = {}
# name -> the seeds the papers sample that set with (used when --seeds is not given).
DEFAULT_SEEDS: dict[str, str] = {}


def register_prompt_set(name: str, loader: Callable[..., list[Any]], seeds: str | None = None) -> None:
    """Make `--prompts NAME` resolve to `loader()` (and `NAME:SOURCE` to `loader(SOURCE)`)."""
    PROMPT_SETS[name] = loader
    if seeds is not None:
        DEFAULT_SEEDS[name] = seeds


def split_spec(spec: str) -> tuple[str, str | None] | None:
    """(name, source) for "NAME" or "NAME:SOURCE" naming a registered set; None otherwise."""
    load_plugins()
    if spec in PROMPT_SETS:
        return spec, None
    name, sep, source = spec.partition(":")
    if sep and name in PROMPT_SETS and source:
        return name, source
    return None


def default_seeds(spec: object) -> str:
    """The seeds a named set is sampled with in the papers ("0" for files and other sets)."""
    named = split_spec(str(spec)) if isinstance(spec, str | Path) and not Path(spec).is_file() else None
    return DEFAULT_SEEDS.get(named[0], "0") if named else "0"


def _as_record(item: object, spec: object) -> dict[str, Any]:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return dict(item)
    raise DataError(f"prompts: {spec!r}: expected strings or records with a 'prompt' string, got {item!r}")


def resolve_prompt_records(spec: str | Path | Sequence[str | dict[str, Any]]) -> list[dict[str, Any]]:
    """Records {"prompt", ...} from a named set, `NAME:SOURCE`, a file, or a list; blanks dropped."""
    if not isinstance(spec, str | Path):
        items: list[Any] = list(spec)
    else:
        path = Path(spec)
        named = None if path.is_file() else split_spec(str(spec))
        if path.is_file():
            items = read_prompts_file(path)
        elif named is not None:
            name, source = named
            items = PROMPT_SETS[name](source) if source is not None else PROMPT_SETS[name]()
        else:
            names = ", ".join(sorted(PROMPT_SETS)) or "none"
            raise ConfigError(f"prompts: {spec!r} is neither a file nor a named set (available: {names})")
    records = [_as_record(item, spec) for item in items]
    records = [r | {"prompt": r["prompt"].strip()} for r in records if r["prompt"] and r["prompt"].strip()]
    if not records:
        raise DataError(f"prompts: {spec!r} holds no prompts")
    return records


def resolve_prompts(spec: str | Path | Sequence[str | dict[str, Any]]) -> list[str]:
    """A prompt list from a named set, `NAME:SOURCE`, a file, or a list (returned as is, minus blanks)."""
    return [r["prompt"] for r in resolve_prompt_records(spec)]


def limit_records(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` prompts, per style when the records have styles (so every style stays)."""
    if limit is None:
        return records
    seen: dict[Any, int] = {}
    kept = []
    for r in records:
        seen[r.get("style")] = seen.get(r.get("style"), 0) + 1
        if seen[r.get("style")] <= limit:
            kept.append(r)
    return kept


def _pick_column(columns: list[str], path: Path) -> str:
    for name in PROMPT_COLUMNS:
        for column in columns:
            if str(column).lower() == name:  # PartiPrompts.tsv calls it "Prompt"
                return column
    raise DataError(f"{path}: no 'prompt' or 'caption' column (columns: {', '.join(map(str, columns))})")


def _from_record(record: object, path: Path, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for name in PROMPT_COLUMNS:
            for key in (name, name.capitalize()):
                if isinstance(record.get(key), str):
                    return record[key]
    raise DataError(f"{path}: {where}: expected a string or an object with a 'prompt' or 'caption' string")


def read_prompts_file(path: str | Path) -> list[str]:
    """Read prompts from `.txt`, `.tsv`, `.csv`, `.json`, `.jsonl` or `.parquet`."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                column = _pick_column(list(reader.fieldnames or []), path)
                return [row[column] or "" for row in reader]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("prompts"), list):
                data = data["prompts"]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of prompts (or {{'prompts': [...]}})")
            return [_from_record(r, path, f"item {i}") for i, r in enumerate(data)]
        if suffix == ".jsonl":
            prompts = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
                    prompts.append(_from_record(record, path, f"line {i}"))
            return prompts
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return [str(p) for p in table.column(_pick_column(table.column_names, path)).to_pylist()]
        return path.read_text(encoding="utf-8").splitlines()
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Seeds from "0,1,2", "0-4" (inclusive), "n:5" (= 0..4), a mix "0-2,10", an int or a list."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return list(dict.fromkeys(int(s) for s in spec))
    text = str(spec).strip()
    if m := re.fullmatch(r"n:(\d+)", text):
        if int(m.group(1)) < 1:
            raise ConfigError(f"seeds: {text!r} asks for no seeds")
        return list(range(int(m.group(1))))
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"seeds: cannot parse {text!r} (use '0,1,2', '0-4' or 'n:5')")
        lo = int(m.group(1))
        seeds.extend(range(lo, int(m.group(2) or lo) + 1))
    return list(dict.fromkeys(seeds))
