"""A person's labels (`online.labels`, xdpo.rollout.labels): the round's images are written for labelling, the
run stops with one line, and the rerun reads the labels back as the round's scores (D3PO's human feedback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from test_train import read_metrics, run
from xdpo.errors import XdpoError
from xdpo.rollout.labels import HumanLabels, image_key


def test_missing_labels_are_written_then_read_back(tmp_path):
    images = [Image.new("RGB", (4, 4), (10 * i, 0, 0)) for i in range(3)]
    prompts = ["a", "b", "a"]
    labels = HumanLabels(tmp_path / "labels.json")
    with pytest.raises(XdpoError, match="online.labels: 3 images await labels"):
        labels(images, prompts)
    data = json.loads((tmp_path / "labels.json").read_text())
    keys = [image_key(im, p) for im, p in zip(images, prompts, strict=True)]
    assert sorted(data["images"]) == sorted(keys) and all(v["label"] is None for v in data["images"].values())
    assert all((tmp_path / v["file"]).is_file() for v in data["images"].values())
    for k, v in zip(keys, (0.5, 2.0, -1.0), strict=True):
        data["images"][k]["label"] = v
    (tmp_path / "labels.json").write_text(json.dumps(data))
    np.testing.assert_array_equal(labels(images, prompts), [0.5, 2.0, -1.0])
    assert image_key(images[0], "a") != image_key(images[0], "b")  # the prompt is part of the key


def test_a_d3po_run_stops_for_labels_and_trains_on_them_when_rerun(tmp_path, monkeypatch, tiny_pipeline_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    file = tmp_path / "labels.json"
    kw = {"loss.objective": "d3po", "online.enabled": True, "online.every": 2, "online.per_prompt": 2,
          "online.labels": file, "online.sample_steps": 2, "online.monitor_images": 0,
          "online.prompts": tmp_path / "prompts.txt", "train.batch_size": 2, "train.max_steps": 2,
          "data.path": "", "data.resolution": 32}  # fmt: skip
    with pytest.raises(XdpoError, match="online.labels: 4 images await labels"):
        run(tmp_path, tiny_pipeline_dir, "", **kw)
    data = json.loads(file.read_text())
    wanted = {k: float(i) for i, k in enumerate(sorted(data["images"]))}
    for k, v in wanted.items():
        data["images"][k]["label"] = v
    file.write_text(json.dumps(data))
    out = run(tmp_path, tiny_pipeline_dir, "", **{**kw, "train.resume_from": "latest"})
    t = load_file(str(out / "online" / "round-0000" / "rollouts.safetensors"))
    assert sorted(t["raw"].reshape(-1).tolist()) == sorted(wanted.values())  # the round's scores: the labels
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
