"""The papers' prompt sets, by name, from the hub (`datasets`, the official files) or a local copy.

--prompts parti                PartiPrompts (Yu et al. 2022), 1,632 prompts: hub dataset
                               nateraw/parti-prompts (column `Prompt`).
--prompts parti:FILE           the official PartiPrompts.tsv (github.com/google-research/parti) or
                               any prompts file.
--prompts hpsv2                the HPSv2 benchmark (HPDv2 test prompts, Wu et al. 2023): 4 styles
                               (anime, concept-art, paintings, photo) x 800, each prompt with its
                               `style` and `prompt_index` (its position in `<style>.json`); from the
                               hpsv2 package's cache ($HPS_ROOT or ~/.cache/hpsv2, datasets/benchmark/)
                               when there, else the same files of the hub dataset zhwang/HPDv2.
--prompts hpsv2:DIR            a folder with the four official JSON lists (anime.json, ...), or one
                               JSON list (its stem is the style).
--prompts hpsv2:anime,photo    some of the styles (from the sources above).
--prompts pickapic-test        Pick-a-Pic v2 test prompts (Kirstain et al. 2023): the unique captions of
                               yuvalkirstain/pickapic_v2, split `test_unique` (500), read column-only.
                               Kang et al. sample each with 5 seeds: its default seeds are 0-4.
--prompts pickapic-test:FILE   a local parquet/csv/txt/... with a `caption` or `prompt` column.
Offline, a hub set fails with one line saying how to pass the local file instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.prompts import read_prompts_file, register_prompt_set

PARTI = ("nateraw/parti-prompts", "train", "Prompt")
PICKAPIC_TEST = ("yuvalkirstain/pickapic_v2", "test_unique", "caption")
HPDV2_REPO = "zhwang/HPDv2"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def _first_line(e: BaseException) -> str:
    from xdpo.evaluate.loading import first_line

    return first_line(e)


def hub_column(repo: str, split: str, column: str, *, name: str, example: str, **kwargs: Any) -> list[str]:
    """One text column of a hub dataset through `datasets.load_dataset`; offline -> a one-line hint."""
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split, **kwargs)
        rows = iter(ds)
        values = []
        for row in rows:
            if column not in row:
                raise DataError(
                    f"prompts {name}: {repo} has no column {column!r} (columns: {', '.join(row)})"
                )
            values.append(str(row[column]))
        return values
    except DataError:
        raise
    except Exception as e:  # offline, not found, network
        raise DataError(
            f"prompts {name}: cannot load {repo} split {split} ({_first_line(e)}); "
            f"offline? pass a local copy: --prompts {name}:{example}"
        ) from None


def parti_prompts(source: str | None = None) -> list[str]:
    """PartiPrompts: 1,632 prompts (hub nateraw/parti-prompts, or a local PartiPrompts.tsv)."""
    if source is not None:
        return read_prompts_file(_existing(source, "parti"))
    repo, split, column = PARTI
    return hub_column(repo, split, column, name="parti", example="/path/PartiPrompts.tsv")


def pickapic_test_prompts(source: str | None = None) -> list[str]:
    """Pick-a-Pic v2 test_unique captions, deduplicated in order (hub, or a local file)."""
    if source is not None:
        prompts = read_prompts_file(_existing(source, "pickapic-test"))
    else:
        repo, split, column = PICKAPIC_TEST
        # Streaming with a column selection reads the captions, not the images, of the parquet shards.
        prompts = hub_column(
            repo,
            split,
            column,
            name="pickapic-test",
            example="/path/test_unique.parquet",
            streaming=True,
            columns=[column],
        )
    return list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))


def _existing(source: str, name: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"prompts {name}: {source} not found")
    return path


def _style_records(style: str, path: Path) -> list[dict[str, Any]]:
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the HPSv2 {style} prompts ({_first_line(e)})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DataError(f"{path}: expected a JSON list of prompt strings")
    return [{"prompt": p, "style": style, "prompt_index": i} for i, p in enumerate(prompts)]


def _official_style_file(style: str) -> Path:
    """<style>.json from the hpsv2 package's cache, else from the hub dataset zhwang/HPDv2."""
    cached = Path(os.environ.get("HPS_ROOT") or "~/.cache/hpsv2").expanduser()
    cached = cached / "datasets" / "benchmark" / f"{style}.json"
    if cached.is_file():
        return cached
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HPDV2_REPO, f"benchmark/{style}.json", repo_type="dataset"))
    except Exception as e:
        raise DataError(
            f"prompts hpsv2: cannot get benchmark/{style}.json from the hub dataset {HPDV2_REPO} "
            f"({_first_line(e)}); offline? pass a folder with {', '.join(s + '.json' for s in HPS_STYLES)}: "
            "--prompts hpsv2:/path/folder"
        ) from None


def hpsv2_prompts(source: str | None = None) -> list[dict[str, Any]]:
    """HPSv2 benchmark prompts as records {prompt, style, prompt_index}, styles in the official order."""
    if source is not None and not Path(source).expanduser().exists():
        styles = [s.strip() for s in source.split(",") if s.strip()]
        if not styles or any(s not in HPS_STYLES for s in styles):
            raise ConfigError(
                f"prompts hpsv2:{source}: neither a folder or JSON file nor styles from {', '.join(HPS_STYLES)}"
            )
        return [r for s in styles for r in _style_records(s, _official_style_file(s))]
    if source is None:
        return [r for s in HPS_STYLES for r in _style_records(s, _official_style_file(s))]
    path = Path(source).expanduser()
    if path.is_file():
        return _style_records(path.stem, path)
    missing = [f"{s}.json" for s in HPS_STYLES if not (path / f"{s}.json").is_file()]
    if missing:
        raise DataError(f"prompts hpsv2: {path} lacks {', '.join(missing)} (the official benchmark files)")
    return [r for s in HPS_STYLES for r in _style_records(s, path / f"{s}.json")]


register_prompt_set("parti", parti_prompts)
register_prompt_set("hpsv2", hpsv2_prompts)
register_prompt_set("pickapic-test", pickapic_test_prompts, seeds="0-4")
