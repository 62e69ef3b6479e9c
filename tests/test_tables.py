"""`compare_folders` / `xdpo compare` on constructed sample folders with known-answer scorers:
xDPO Table 2 (mean per model and prompt set) and Kang et al. Table 1 (same-seed win rates vs baselines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xdpo.cli import main
from xdpo.errors import ConfigError
from xdpo.evaluate.scorers import SCORERS, FunctionScorer
from xdpo.evaluate.tables import compare_folders, parse_models

PARTI = [(p, s) for p in ("p0", "p1", "p2") for s in (0, 1)]
# HPSv2 benchmark rows: (style, prompt_index, prompt); "photo" holds one prompt twice, as a list may.
HPS = [("anime", 0, "a0"), ("anime", 1, "a1"), ("photo", 0, "ph"), ("photo", 1, "ph")]
GREY = {  # grey level of each image: model -> prompt set -> values in row order
    "base": {"parti": [100] * 6, "hpsv2": [50, 50, 50, 60]},
    "dpo": {"parti": [110, 120, 90, 100, 130, 140], "hpsv2": [40, 70, 55, 65]},
    "xdpo": {"parti": [200] * 6},
}
LOADS = {"n": 0}


def make_folder(folder: Path, model: str, pset: str) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.jsonl").open("w") as f:
        rows = PARTI if pset == "parti" else HPS
        for i, (row, grey) in enumerate(zip(rows, GREY[model][pset], strict=True)):
            file = f"images/{i:05d}.png"
            Image.fromarray(np.full((8, 8, 3), grey, dtype=np.uint8)).save(folder / file)
            if pset == "parti":
                record = {"prompt": row[0], "seed": row[1], "prompt_set": "parti:/data/PartiPrompts.tsv"}
            else:
                record = {
                    "prompt": row[2],
                    "seed": 0,
                    "style": row[0],
                    "prompt_index": row[1],
                    "prompt_set": "hpsv2",
                }
            f.write(json.dumps(record | {"index": i, "file": file, "model": model}) + "\n")
    return folder


def grey(images, prompts):
    return np.array([np.asarray(im)[0, 0, 0] for im in images], dtype=float)


@pytest.fixture(autouse=True)
def scorers(monkeypatch):
    def factory(name, fn):
        def load(device=None):
            LOADS["n"] += 1
            return FunctionScorer(name, fn, f"{name} v1")

        return load

    LOADS["n"] = 0
    monkeypatch.setitem(SCORERS, "grey", factory("grey", grey))
    monkeypatch.setitem(SCORERS, "dark", factory("dark", lambda i, p: 255 - grey(i, p)))


@pytest.fixture()
def folders(tmp_path):
    return [
        ("base", make_folder(tmp_path / "base_parti", "base", "parti")),
        ("base", make_folder(tmp_path / "base_hps", "base", "hpsv2")),
        ("dpo", make_folder(tmp_path / "dpo_parti", "dpo", "parti")),
        ("dpo", make_folder(tmp_path / "dpo_hps", "dpo", "hpsv2")),
        ("xdpo", make_folder(tmp_path / "xdpo_parti", "xdpo", "parti")),
    ]


def test_table2_and_win_rates_known_answers(folders, tmp_path):
    out = tmp_path / "report"
    r = compare_folders(
        folders, "grey,dark", out=out, baselines=["base", "dpo"], n_resamples=200, progress=False
    )
    assert LOADS["n"] == 2  # each scorer loaded once for all five folders

    t2 = pd.read_csv(out / "table2.csv")
    assert list(t2.columns) == ["model", "prompt_set", "grey", "dark"]
    got = {(m, p): g for m, p, g in zip(t2.model, t2.prompt_set, t2.grey, strict=True)}
    assert got == {
        ("base", "parti"): 100,
        ("base", "hpsv2"): 52.5,
        ("dpo", "parti"): 115,
        ("dpo", "hpsv2"): 57.5,
    } | {("xdpo", "parti"): 200}
    long = pd.read_csv(out / "table2_long.csv")
    styles = long[(long.model == "dpo") & (long.scorer == "grey") & (long.prompt_set == "hpsv2")]
    assert dict(zip(styles["style"], styles["mean"], strict=True)) == {"all": 57.5, "anime": 55, "photo": 60}
    assert (long.ci_low <= long["mean"]).all() and (long["mean"] <= long.ci_high).all()

    # Only xdpo is not a baseline: its rows against base and dpo (on parti, the only set it has).
    wr = pd.read_csv(out / "winrates.csv")
    assert wr[["model", "baseline", "prompt_set"]].values.tolist() == [
        ["xdpo", "base", "parti"],
        ["xdpo", "dpo", "parti"],
    ]
    assert (
        wr.grey.tolist() == [1.0, 1.0]
        and wr.dark.tolist() == [0.0, 0.0]
        and wr.average.tolist() == [0.5, 0.5]
    )
    assert wr.n_matched.tolist() == [6, 6]
    md = (out / "winrates.md").read_text()
    assert "| model | baseline | prompt_set | grey | dark | average | n_matched |" in md
    assert "| xdpo | base | parti | 100.0 | 0.0 | 50.0 | 6 |" in md and "ties count 0.5" in md
    assert "`grey`: grey v1" in (out / "table2.md").read_text()
    for png in ("table2.png", "winrates.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300
    assert json.loads((out / "compare.json").read_text())["baselines"] == ["base", "dpo"]
    assert r["winrates"][0]["grey"] == 1.0


def test_default_baseline_ties_and_repeated_benchmark_prompts(folders, tmp_path):
    r = compare_folders(
        folders, ["grey", "dark"], out=tmp_path / "r", n_resamples=200, plots=False, progress=False
    )
    rows = {(w["model"], w["prompt_set"]): w for w in r["winrates"]}
    assert set(rows) == {("dpo", "parti"), ("dpo", "hpsv2"), ("xdpo", "parti")}  # vs the first model
    # dpo vs base on parti: 4 wins, 1 tie, 1 loss -> (4 + 0.5) / 6 under grey; the reverse under dark.
    assert rows[("dpo", "parti")]["grey"] == 0.75 and rows[("dpo", "parti")]["dark"] == 0.25
    # On hpsv2 the repeated "ph" is matched by occurrence: 55 vs 50, 65 vs 60; a0 lost, a1 won.
    assert rows[("dpo", "hpsv2")]["grey"] == 0.75 and rows[("dpo", "hpsv2")]["n_matched"] == 4
    long = pd.DataFrame(r["winrates_long"])
    d = long[(long.model == "dpo") & (long.prompt_set == "parti") & (long.scorer == "grey")].iloc[0]
    assert (d.wins, d.ties, d.losses) == (4, 1, 1) and d.ci_low <= 0.75 <= d.ci_high
    assert not (tmp_path / "r" / "table2.png").exists()


def test_errors(folders, tmp_path):
    with pytest.raises(ConfigError, match=r"two folders for model 'base' on prompt set 'parti'"):
        compare_folders([folders[0], folders[0]], "grey", out=tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match=r"baseline 'sd15' is not a model name \(base, dpo, xdpo\)"):
        compare_folders(folders, "grey", out=tmp_path / "x", baselines=["sd15"], progress=False)
    assert parse_models(["a=x/y", "runs/dpo"]) == [("a", Path("x/y")), ("dpo", Path("runs/dpo"))]


def test_compare_cli(folders, tmp_path, capsys):
    args = ["compare"] + [f"{name}={folder}" for name, folder in folders]
    args += [
        "--baseline",
        "base",
        "--scorers",
        "grey,dark",
        "--out",
        str(tmp_path / "cli"),
        "--bootstrap",
        "100",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "xDPO Table 2 shape" in printed and "Kang et al. Table 1 shape" in printed
    assert "| dpo | base | parti | 75.0 | 25.0 | 50.0 | 6 |" in printed
    assert (tmp_path / "cli" / "winrates.png").is_file()
