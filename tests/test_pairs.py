"""`xdpo pairs` (on-policy pairs labelled by a reward) and `xdpo relabel` (AI feedback)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xdpo.cli import main
from xdpo.errors import ConfigError
from xdpo.pairs.generate import make_pairs
from xdpo.rollout.pairing import pair_up
from xdpo.rollout.rewards import load_reward

PLUGIN = """
import numpy as np

def brightness(images, prompts):
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean()) for im in images]
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "myscores.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def brightness(data: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64).mean())


def test_pair_up_best_vs_worst_and_min_gap():
    assert pair_up([0.1, 0.9, 0.5], None) == [(1, 0)]
    assert pair_up([1.0, 1.0], None) == []
    assert sorted(pair_up([0.0, 1.0, 0.55], 0.5)) == [(1, 0), (2, 0)]
    assert pair_up([0.0, 0.2], 0.5) == []


def test_weighted_and_plugin_rewards(plugin_dir):
    img = [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 200)]
    one = load_reward("myscores:brightness")
    np.testing.assert_allclose(one(img, ["a", "b"]), [10.0, 200.0])
    two = load_reward("myscores:brightness:0.5,myscores:brightness:2")
    np.testing.assert_allclose(two(img, ["a", "b"]), [25.0, 500.0])
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("nosuchmodule:f")
    with pytest.raises(ConfigError, match="unknown scorer"):
        load_reward("no-such-scorer")


def test_pairs_labels_agree_with_scores_and_seeds_regenerate(tmp_path, plugin_dir):
    out = tmp_path / "p.parquet"
    code = main(
        ["pairs", "--model", "digits", "--prompts", "digits", "--limit", "3", "--per-prompt", "3",
         "--scorer", "myscores:brightness", "--steps", "4", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    t = pq.read_table(out).to_pylist()
    assert len(t) == 3 and {r["prompt_index"] for r in t} == {0, 1, 2}
    for r in t:
        assert r["label_0"] == 1.0 and r["score_0"] > r["score_1"]
        assert brightness(r["jpg_0"]) == pytest.approx(r["score_0"], abs=1e-6)  # the score is the image's
        assert brightness(r["jpg_1"]) == pytest.approx(r["score_1"], abs=1e-6)
        assert r["prompt_index"] * 3 <= r["seed_0"] < r["prompt_index"] * 3 + 3
    # the recorded seed regenerates the winner
    import torch

    from xdpo.evaluate.pipeline import load_pipeline

    pipe = load_pipeline("digits", scheduler="ddim", device="cpu")
    r = t[1]
    img = pipe(prompt=[r["caption"]], generator=[torch.Generator().manual_seed(r["seed_0"])],
               num_inference_steps=4, guidance_scale=5.0).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(r["jpg_0"])).convert("RGB")))
    assert (tmp_path / "p.parquet.json").is_file() and not (tmp_path / "p.parquet.parts").exists()


def test_pairs_resume_after_a_kill(tmp_path, plugin_dir):
    calls = {"n": 0}
    base = load_reward("myscores:brightness")

    def dies_on_second_chunk(images, prompts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return base(images, prompts)

    kw = {"out": tmp_path / "r.parquet", "per_prompt": 2, "reward_spec": "b", "steps": 3, "chunk": 2,
          "limit": 4, "progress": False}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        make_pairs("digits", "digits", reward=dies_on_second_chunk, **kw)
    assert (tmp_path / "r.parquet.parts" / "part-00000.parquet").is_file()
    calls["n"] = 0

    def counting(images, prompts):
        calls["n"] += 1
        return base(images, prompts)

    summary = make_pairs("digits", "digits", reward=counting, **kw)
    assert calls["n"] == 1  # only the chunk that was not done
    assert summary["pairs"] == pq.read_table(tmp_path / "r.parquet").num_rows >= 1
    with pytest.raises(ConfigError, match="other settings"):
        (tmp_path / "r.parquet.parts").mkdir()
        (tmp_path / "r.parquet.parts" / "settings.json").write_text("{}")
        make_pairs("digits", "digits", reward=counting, **kw)


def test_relabel_with_a_plugin_reward(tmp_path, plugin_dir, pairs_parquet):
    out = tmp_path / "relabelled.parquet"
    assert (
        main(["relabel", "--data", str(pairs_parquet), "--scorer", "myscores:brightness", "--out", str(out)])
        == 0
    )
    rows = pq.read_table(out).to_pylist()
    for r in rows:
        b0, b1 = brightness(r["jpg_0"]), brightness(r["jpg_1"])
        assert r["label_0"] == (1.0 if b0 > b1 else 0.0 if b0 < b1 else 0.5)
        assert r["label_1"] == 1.0 - r["label_0"]
        if r["label_0_original"] != 0.5:  # the fixture's winners are the brighter images
            assert r["label_0"] == r["label_0_original"]
