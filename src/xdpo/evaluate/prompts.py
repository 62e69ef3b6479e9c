"""Prompt lists and seed lists for sampling.

`resolve_prompts(spec)` accepts a named built-in set (`digits`; later issues add `parti`, `hpsv2`,
`pickapic-test` through `register_prompt_set`) or a file: `.txt` (one prompt per line), `.tsv`,
`.csv`, `.json`, `.jsonl` or `.parquet` with a `prompt` (or `caption`) column.
`parse_seeds(spec)` accepts "0,1,2", "0-4" (inclusive), "n:5" (= 0-4), or a mix "0-2,10".
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from xdpo.errors import ConfigError, DataError

PROMPT_COLUMNS = ("prompt", "caption")

# name -> zero-argument function returning the prompt list (loaded lazily).
PROMPT_SETS: dict[str, Callable[[], list[str]]] = {}


def register_prompt_set(name: str, loader: Callable[[], list[str]]) -> None:
    """Make `--prompts NAME` resolve to `loader()`."""
    PROMPT_SETS[name] = loader


def _digits_eval_prompts() -> list[str]:
    """The digits world's held-out evaluation prompts (phrasings never seen in training)."""
    from xdpo.digits.data import eval_prompts

    return eval_prompts()


register_prompt_set("digits", _digits_eval_prompts)


def resolve_prompts(spec: str | Path | Sequence[str]) -> list[str]:
    """A prompt list from a named set, a file, or a list (returned as is, minus blanks)."""
    if not isinstance(spec, str | Path):
        prompts = [str(p) for p in spec]
    else:
        path = Path(spec)
        if path.is_file():
            prompts = read_prompts_file(path)
        elif str(spec) in PROMPT_SETS:
            prompts = PROMPT_SETS[str(spec)]()
        else:
            names = ", ".join(sorted(PROMPT_SETS)) or "none"
            raise ConfigError(f"prompts: {spec!r} is neither a file nor a named set (available: {names})")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise DataError(f"prompts: {spec!r} holds no prompts")
    return prompts


def _pick_column(columns: list[str], path: Path) -> str:
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise DataError(f"{path}: no 'prompt' or 'caption' column (columns: {', '.join(map(str, columns))})")


def _from_record(record: object, path: Path, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for name in PROMPT_COLUMNS:
            if isinstance(record.get(name), str):
                return record[name]
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
