"""The papers' prompt sets (parti, hpsv2, pickapic-test) from small local files, a stubbed hub, and offline;
`xdpo sample --layout hpsv2` writes the official HPSv2 evaluation layout with a complete manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdpo.cli import main
from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.prompt_sets import HPS_STYLES
from xdpo.evaluate.prompts import default_seeds, limit_records, resolve_prompt_records, resolve_prompts
from xdpo.evaluate.sample import read_manifest


def write_hps_folder(folder: Path, n: int = 3) -> Path:
    """The four official benchmark files, as lists of n prompts ("photo" repeats a prompt, as lists may)."""
    folder.mkdir(parents=True, exist_ok=True)
    for style in HPS_STYLES:
        prompts = [f"{style} prompt {i}" for i in range(n)]
        if style == "photo":
            prompts[-1] = prompts[0]
        (folder / f"{style}.json").write_text(json.dumps(prompts))
    return folder


def test_parti_from_the_official_tsv(tmp_path):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na red cube\tArtifacts\tColors\tx\n"
    )
    assert resolve_prompts(f"parti:{tsv}") == ["bond", "a red cube"]
    assert resolve_prompts(tsv) == ["bond", "a red cube"]  # the 'Prompt' column, any case
    with pytest.raises(DataError, match=r"prompts parti: .*nope.tsv not found"):
        resolve_prompts(f"parti:{tmp_path / 'nope.tsv'}")


def test_hub_sets_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def load_dataset(repo, split=None, **kwargs):
        calls.append((repo, split, kwargs))
        if repo == "nateraw/parti-prompts":
            return datasets.Dataset.from_dict({"Prompt": ["a", "b"], "Category": ["x", "y"]})
        return datasets.Dataset.from_dict({"caption": ["c", "d", "c", " "]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert resolve_prompts("parti") == ["a", "b"]
    assert resolve_prompts("pickapic-test") == ["c", "d"]  # unique captions, in order
    assert calls[0] == ("nateraw/parti-prompts", "train", {})
    assert calls[1] == (
        "yuvalkirstain/pickapic_v2",
        "test_unique",
        {"streaming": True, "columns": ["caption"]},
    )


def test_hub_sets_offline_say_how_to_pass_a_local_file():
    # conftest sets HF_DATASETS_OFFLINE=1 and an empty datasets cache.
    with pytest.raises(
        DataError,
        match=r"prompts parti: cannot load nateraw/parti-prompts .*--prompts parti:/path/PartiPrompts.tsv",
    ):
        resolve_prompts("parti")
    with pytest.raises(
        DataError, match=r"pickapic-test: .*--prompts pickapic-test:/path/test_unique.parquet"
    ):
        resolve_prompts("pickapic-test")


def test_pickapic_test_local_files_and_five_seeds(tmp_path):
    pq.write_table(
        pa.table({"caption": ["a cat", "a dog", "a cat"], "label_0": [1.0, 0.0, 0.5]}), tmp_path / "t.parquet"
    )
    assert resolve_prompts(f"pickapic-test:{tmp_path / 't.parquet'}") == ["a cat", "a dog"]
    (tmp_path / "t.txt").write_text("x\ny\nx\n")
    assert resolve_prompts(f"pickapic-test:{tmp_path / 't.txt'}") == ["x", "y"]
    assert (
        default_seeds("pickapic-test") == "0-4" and default_seeds(f"pickapic-test:{tmp_path}/t.txt") == "0-4"
    )
    assert default_seeds("parti") == "0" and default_seeds(tmp_path / "t.txt") == "0"


def test_hpsv2_from_a_local_folder_keeps_style_and_position(tmp_path):
    folder = write_hps_folder(tmp_path / "bench")
    records = resolve_prompt_records(f"hpsv2:{folder}")
    assert len(records) == 4 * 3 and [r["style"] for r in records[::3]] == list(HPS_STYLES)
    assert records[3] == {"prompt": "concept-art prompt 0", "style": "concept-art", "prompt_index": 0}
    assert records[-1] == {"prompt": "photo prompt 0", "style": "photo", "prompt_index": 2}  # repeat kept
    one = resolve_prompt_records(f"hpsv2:{folder / 'anime.json'}")
    assert [r["style"] for r in one] == ["anime"] * 3
    assert [r["prompt_index"] for r in limit_records(records, 2)] == [0, 1] * 4  # --limit is per style
    (folder / "photo.json").unlink()
    with pytest.raises(DataError, match=r"bench lacks photo.json"):
        resolve_prompt_records(f"hpsv2:{folder}")


def test_hpsv2_official_cache_style_subset_and_offline(tmp_path, monkeypatch):
    write_hps_folder(tmp_path / "hps" / "datasets" / "benchmark")
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))  # where the hpsv2 package keeps the files
    assert [r["style"] for r in resolve_prompt_records("hpsv2:anime,photo")] == ["anime"] * 3 + ["photo"] * 3
    assert len(resolve_prompt_records("hpsv2")) == 12
    with pytest.raises(ConfigError, match=r"neither a folder or JSON file nor styles"):
        resolve_prompt_records("hpsv2:cartoon")
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "empty"))
    with pytest.raises(
        DataError,
        match=r"benchmark/anime.json from the hub dataset zhwang/HPDv2 .*--prompts hpsv2:/path/folder",
    ):
        resolve_prompt_records("hpsv2")


def test_sample_hpsv2_layout_is_the_official_one(tiny_pipeline_dir, tmp_path, capsys):
    folder = write_hps_folder(tmp_path / "bench")
    common = ["sample", "--model", str(tiny_pipeline_dir), "--prompts", f"hpsv2:{folder}", "--steps", "1"]
    common += ["--guidance", "1", "--batch-size", "8", "--layout", "hpsv2"]
    out = tmp_path / "hps_out"
    assert main([*common, "--limit", "2", "--out", str(out)]) == 0
    for style in HPS_STYLES:  # what hpsv2's BenchmarkDataset reads: <style>/<index:05d>.jpg
        prompts = json.loads((folder / f"{style}.json").read_text())
        assert sorted(p.name for p in (out / style).iterdir()) == ["00000.jpg", "00001.jpg"]
        assert [r["prompt"] for r in read_manifest(out) if r["style"] == style] == prompts[:2]
    row = read_manifest(out)[2]
    assert {k: row[k] for k in ("prompt", "seed", "file", "style", "prompt_index")} == {
        "prompt": "concept-art prompt 0",
        "seed": 0,
        "file": "concept-art/00000.jpg",
        "style": "concept-art",
        "prompt_index": 0,
    }
    assert row["prompt_set"] == f"hpsv2:{folder}"

    # Several seeds: one official-layout folder per seed; every image is in the manifest.
    assert main([*common, "--seeds", "0,7", "--out", str(out)]) == 0
    rows = read_manifest(out)
    assert len(rows) == 4 * 3 * 2 and not (out / "anime").exists()  # the old images were removed
    assert {r["file"] for r in rows} == {
        f"seed{s}/{st}/{i:05d}.jpg" for s in (0, 7) for st in HPS_STYLES for i in range(3)
    }
    assert all((out / r["file"]).is_file() for r in rows)
    photo = [r for r in rows if r["style"] == "photo" and r["seed"] == 0]
    assert photo[0]["prompt"] == photo[2]["prompt"] and photo[2]["file"] == "seed0/photo/00002.jpg"

    (tmp_path / "p.txt").write_text("a cat\n")
    args = [
        "sample",
        "--model",
        str(tiny_pipeline_dir),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--layout",
        "hpsv2",
    ]
    assert main([*args, "--out", str(out)]) == 2
    assert "layout hpsv2 needs the HPSv2 benchmark prompts" in capsys.readouterr().err
