"""End to end: `xdpo.train.recipe.train` on webdataset tar shards with the tiny pipeline."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from test_data_webdataset import write_shard
from xdpo.config import load_config
from xdpo.train.recipe import train


def texture(rng: np.random.Generator, bright: float) -> bytes:
    arr = np.clip(rng.uniform(40, 215, size=(36, 40, 3)) + bright, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_two_steps_on_webdataset_shards(tmp_path, tiny_pipeline_dir):
    rng = np.random.default_rng(0)
    labels = ["1.0", "0.0", "0.5", "1", "0", "1.0"]
    samples = [
        {
            "__key__": f"{i:06d}",
            "caption": f"a bright picture, number {i}",
            "jpg_0": texture(rng, 60.0 if lab in ("1.0", "1") else -60.0),
            "jpg_1": texture(rng, -60.0 if lab in ("1.0", "1") else 60.0),
            "label_0": lab,
        }
        for i, lab in enumerate(labels)
    ]
    write_shard(tmp_path / "shards" / "train-00000.tar", samples[:4])
    write_shard(tmp_path / "shards" / "train-00001.tar", samples[4:])
    overrides = {
        "output_dir": tmp_path / "run",
        "model.pretrained": tiny_pipeline_dir,
        "data.path": tmp_path / "shards",
        "data.resolution": 32,
        "data.ties": "keep",
        "train.max_steps": 2,
        "train.batch_size": 2,
        "train.learning_rate": 1e-3,
        "train.scale_lr": False,
        "train.warmup_steps": 0,
        "train.checkpoint_every": 0,
        "loss.beta": 100.0,
    }
    out = train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["pairs_seen"] == 4
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train-00000.tar", "train-00001.tar"]
