"""`evaluate_folder` / `xdpo evaluate` on hand-made sample folders with a known-answer scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xdpo.cli import main
from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.evaluate import evaluate_folder, score_folder
from xdpo.evaluate.scorers import SCORERS, FunctionScorer, load_scorers


def make_folder(folder: Path, rows: list[tuple[str, int, int]]) -> Path:
    """A sample folder: one flat grey PNG per (prompt, seed, grey level) + manifest.jsonl."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.jsonl").open("w") as f:
        for i, (prompt, seed, grey) in enumerate(rows):
            file = f"images/{i:05d}.png"
            Image.fromarray(np.full((8, 8, 3), grey, dtype=np.uint8)).save(folder / file)
            record = {"index": i, "prompt": prompt, "seed": seed, "file": file, "model": "m", "steps": 2}
            f.write(json.dumps(record | {"guidance": 1.0, "scheduler": "ddim", "lora": None}) + "\n")
    return folder


CALLS = {"n": 0}


def brightness(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    """Known answer: the grey level of each flat image."""
    CALLS["n"] += len(images)
    return np.array([np.asarray(im)[0, 0, 0] for im in images], dtype=float)


@pytest.fixture(autouse=True)
def brightness_scorer(monkeypatch):
    CALLS["n"] = 0
    monkeypatch.setitem(
        SCORERS, "brightness", lambda device=None: FunctionScorer("brightness", brightness, "v1", 3)
    )
    monkeypatch.setitem(
        SCORERS,
        "prompt-length",
        lambda device=None: FunctionScorer("prompt-length", lambda i, p: [len(x) for x in p], "v1"),
    )


@pytest.fixture()
def folders(tmp_path):
    # A beats B on (a, 0) and (b, 0), ties on (a, 1), loses on (b, 1); (c, 0) and (d, 5) are unmatched.
    a = make_folder(tmp_path / "A", [("a", 0, 200), ("a", 1, 100), ("b", 0, 90), ("b", 1, 10), ("c", 0, 50)])
    b = make_folder(tmp_path / "B", [("a", 0, 100), ("a", 1, 100), ("b", 0, 80), ("b", 1, 20), ("d", 5, 0)])
    return a, b


def test_evaluate_with_baseline_known_answers(folders, tmp_path):
    a, b = folders
    out = tmp_path / "report"
    s = evaluate_folder(a, "brightness,prompt-length", baseline=b, out=out, progress=False)
    r = s["scorers"]["brightness"]
    assert r["details"] == "v1" and r["n"] == 5
    assert r["mean"] == pytest.approx(90.0) and r["median"] == 90.0
    assert r["ci95"][0] < 90.0 < r["ci95"][1]
    assert r["baseline"]["mean"] == pytest.approx(60.0)
    w = r["vs_baseline"]
    assert (w["win_rate"], w["wins"], w["ties"], w["losses"]) == (0.625, 2, 1, 1)
    assert (w["n_matched"], w["n_unmatched_a"], w["n_unmatched_b"]) == (4, 1, 1)
    assert s["scorers"]["prompt-length"]["vs_baseline"]["win_rate"] == 0.5  # same prompts: all ties
    assert s["settings"]["model"] == "m" and s["n_baseline"] == 5

    table = pd.read_parquet(out / "scores.parquet")
    assert list(table.columns) == ["prompt", "seed", "file", "brightness", "prompt-length"]
    assert table["brightness"].tolist() == [200, 100, 90, 10, 50]
    assert json.loads((out / "summary.json").read_text())["scorers"]["brightness"]["mean"] == pytest.approx(
        90.0
    )
    md = (out / "summary.md").read_text()
    assert "| scorer | mean | median | 95% CI | baseline mean | win rate vs baseline |" in md
    assert "| brightness | 90 | 90 |" in md and "| 0.625 |" in md and "| 4 |" in md
    # Both sample folders now carry a score cache; the report folder has no manifest of its own.
    assert (a / "scores.parquet").is_file() and (b / "scores.meta.json").is_file()


def test_scores_are_cached_per_folder_and_refreshed_when_stale(folders):
    a, b = folders
    evaluate_folder(a, ["brightness"], baseline=b, progress=False)
    assert CALLS["n"] == 10
    evaluate_folder(a, ["brightness"], baseline=b, progress=False)
    assert CALLS["n"] == 10  # both folders reused their cache
    evaluate_folder(a, ["brightness"], baseline=b, reuse=False, progress=False)
    assert CALLS["n"] == 20
    # A new scorer version invalidates that column only; a rewritten manifest invalidates the cache.
    v2 = FunctionScorer("brightness", brightness, "v2")
    evaluate_folder(a, [v2, "prompt-length"], progress=False)
    assert CALLS["n"] == 25
    meta = json.loads((a / "scores.meta.json").read_text())
    assert meta["scorers"] == {"brightness": "v2", "prompt-length": "v1"}
    make_folder(a, [("a", 0, 7)])
    assert score_folder(a, [v2], progress=False)["brightness"].tolist() == [7.0]
    assert CALLS["n"] == 26


def test_default_output_is_the_sample_folder_and_csv_format(folders, tmp_path):
    a, _ = folders
    s = evaluate_folder(a, ["brightness"], progress=False)
    assert Path(s["files"]["summary_md"]) == a / "summary.md"
    assert "| scorer | mean | median | 95% CI |\n" in (a / "summary.md").read_text()
    assert "vs_baseline" not in s["scorers"]["brightness"]
    evaluate_folder(a, ["brightness"], out=tmp_path / "csv", fmt="csv", progress=False)
    assert pd.read_csv(tmp_path / "csv" / "scores.csv")["brightness"].tolist() == [200, 100, 90, 10, 50]


def test_nothing_matches_is_an_error(tmp_path):
    a = make_folder(tmp_path / "A", [("a", 0, 1)])
    b = make_folder(tmp_path / "B", [("a", 1, 1)])
    with pytest.raises(DataError, match="no \\(prompt, seed\\) pair matches"):
        evaluate_folder(a, ["brightness"], baseline=b, progress=False)


def test_manifest_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"missing.*manifest.jsonl not found"):
        evaluate_folder(tmp_path / "missing", ["brightness"], progress=False)
    a = make_folder(tmp_path / "A", [("a", 0, 1), ("a", 1, 2)])
    lines = (a / "manifest.jsonl").read_text().splitlines()
    (a / "manifest.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"manifest.jsonl: line 2: invalid JSON"):
        evaluate_folder(a, ["brightness"], progress=False)
    (a / "manifest.jsonl").write_text(lines[0] + '\n{"prompt": "x", "file": "y.png"}\n')
    with pytest.raises(DataError, match=r"line 2: missing key\(s\) seed"):
        evaluate_folder(a, ["brightness"], progress=False)
    (a / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (a / "images" / "00001.png").unlink()
    with pytest.raises(DataError, match=r"line 2: cannot read image .*00001.png"):
        evaluate_folder(a, ["brightness"], progress=False)


def test_scorer_registry_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown scorer 'nope' \(available: .*digits-alignment.*digits-reward"
    ):
        load_scorers("brightness,nope")
    with pytest.raises(ConfigError, match="appears twice"):
        load_scorers("brightness,brightness")
    a = make_folder(tmp_path / "A", [("a", 0, 1), ("b", 0, 2)])
    bad = FunctionScorer("bad", lambda images, prompts: np.zeros(1))
    with pytest.raises(DataError, match="scorer bad: 1 scores for 2 images"):
        score_folder(a, [bad], progress=False)

    def picky(images, prompts):
        raise DataError(f"prompt {prompts[-1]!r} names no digit")

    with pytest.raises(
        DataError, match=r"scorer picky \(.*A/manifest.jsonl, rows 1-2\): prompt 'b' names no"
    ):
        score_folder(a, [FunctionScorer("picky", picky)], progress=False)


def test_cli_evaluate(folders, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "cli"
    assert (
        main(
            [
                "evaluate",
                "--images",
                str(a),
                "--baseline",
                str(b),
                "--scorers",
                "brightness",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| brightness | 90 | 90 |" in printed and (out / "summary.md").is_file()
    assert main(["evaluate", "--images", str(tmp_path / "nowhere"), "--scorers", "brightness"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xdpo evaluate: error:") and "nowhere/manifest.jsonl not found" in err
    assert len(err.splitlines()) == 1
    assert main(["evaluate", "--images", str(a), "--scorers", "nope"]) == 2
    assert "available:" in capsys.readouterr().err
