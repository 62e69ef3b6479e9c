"""Per-image data for Diffusion-KTO (data.format=images) and SDXL's per-image sizes and crop offsets."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from test_data_webdataset import write_shard
from xdpo.config import load_config
from xdpo.data import (
    PreferenceImages,
    PreferencePairs,
    collate_images,
    collate_pairs,
    load_preference_table,
    open_data,
    open_images,
)
from xdpo.data.transforms import RESAMPLE, to_tensor
from xdpo.errors import ConfigError, DataError

R = 32


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image of `size` = (width, height) whose every crop is distinct."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def kto_parquet(path, labels, **names):
    cols = {"image": "image", "caption": "caption", "label": "label", **names}
    n = len(labels)
    pq.write_table(
        pa.table(
            {
                cols["image"]: [
                    png(Image.new("RGB", (24, 20), (200 if lab else 20, 0, 0))) for lab in labels
                ],
                cols["caption"]: [f"c{i}" for i in range(n)],
                cols["label"]: labels,
            }
        ),
        path,
    )
    return path


def cfg_for(path, *overrides):
    base = ["model.pretrained=m", f"data.path={path}", "data.resolution=16", "data.format=images"]
    return load_config(None, [*base, "loss.objective=kto", *overrides])


# ------------------------------------------------------------------------------------------- per-image


def test_per_image_items_and_batches(tmp_path):
    path = kto_parquet(tmp_path / "kto.parquet", [1.0, 0.0, 1.0, 0.0, 0.0])
    _, images, n = open_images(cfg_for(path))
    assert isinstance(images, PreferenceImages) and n == 5 and images.n_desirable == 2
    item = images[(1, 3)]
    assert set(item) >= {"caption", "pixel", "desirable", "row", "original_size", "crop_top_left"}
    assert (item["caption"], item["desirable"], item["row"]) == ("c1", False, 1)
    assert item["original_size"].tolist() == [20, 24] and item["crop_top_left"].tolist() == [
        0,
        2,
    ]  # 19 x 16: (19 - 16) / 2 = 1.5 -> 2
    batch = collate_images([images[(i, i)] for i in range(4)])
    assert not batch.pairs and batch.pixels.shape == (4, 3, 16, 16) and batch.pixels.dtype == torch.float32
    assert batch.label.tolist() == [1.0, 0.0, 1.0, 0.0]  # desirable
    assert batch.rows.tolist() == [0, 1, 2, 3] and batch.captions == ["c0", "c1", "c2", "c3"]
    assert batch.sizes["original_size"].shape == (4, 2) and batch.sizes["crop_top_left"].dtype == torch.long
    bright = batch.pixels[:, 0].mean(dim=(1, 2))
    desirable = batch.label == 1
    assert bool((bright[desirable] > 0).all() and (bright[~desirable] < 0).all())
    assert len(open_images(cfg_for(path, "data.max_pairs=3"))[1]) == 3


def test_per_image_columns_labels_and_errors(tmp_path):
    path = kto_parquet(
        tmp_path / "k.parquet", [True, False, True], image="jpg", caption="prompt", label="thumbs_up"
    )
    cfg = cfg_for(path, "data.columns=image:jpg,caption:prompt,label:thumbs_up")
    _, images, n = open_data(cfg)
    assert isinstance(images, PreferenceImages) and images.labels.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(DataError, match=r"missing column\(s\) image; data.format=images needs image"):
        load_preference_table(str(path), fmt="images", columns={"caption": "prompt"})
    with pytest.raises(DataError, match=r"missing column\(s\) picture named by data.columns=image:picture"):
        load_preference_table(str(path), fmt="images", columns={"image": "picture"})
    bad = kto_parquet(tmp_path / "bad.parquet", [1.0, 0.0, 0.5], label="score")
    with pytest.raises(
        DataError,
        match=r"bad.parquet: row 2, column score \(label\): expected 1 \(desirable\) or 0 \(undesirable\), got 0.5",
    ):
        open_images(cfg_for(bad, "data.columns=label:score"))
    assert len(open_images(cfg_for(bad, "data.columns=label:score", "data.on_bad_row=skip"))[1]) == 2


def test_per_image_config_rules(tmp_path):
    with pytest.raises(
        ConfigError, match="config key `data.format`: images needs loss.objective=kto or seppo, not pair"
    ):
        load_config(None, ["model.pretrained=m", "data.path=d", "data.format=images"])
    with pytest.raises(
        ConfigError, match="config key `data.cache`: is not available with data.format=images"
    ):
        cfg_for("d", "data.cache=somewhere")
    with pytest.raises(
        ConfigError, match="data.columns`: unknown name.* jpg_0; with data.format=images it maps image"
    ):
        cfg_for("d", "data.columns=jpg_0:x")


def test_per_image_webdataset_shards(tmp_path):
    samples = [
        {"__key__": f"k{i}", "jpg": png(noise((20, 20), i)), "txt": f"caption {i}", "cls": str(i % 2)}
        for i in range(4)
    ]
    write_shard(tmp_path / "kto" / "kto-00000.tar", samples)
    _, images, n = open_images(cfg_for(tmp_path / "kto", "data.columns=image:jpg,caption:txt,label:cls"))
    assert n == 4 and [images[(i, 0)]["desirable"] for i in range(4)] == [False, True, False, True]
    assert images[(2, 0)]["caption"] == "caption 2"


# ---------------------------------------------------------------------------------------------- SDXL


def expected_pixels(img: Image.Image, size: tuple[int, int], top: int, left: int, flip: bool) -> torch.Tensor:
    """Hand-made reference: resize to `size`, crop the R x R square at (top, left), mirror when `flip`."""
    crop = img.resize(size, RESAMPLE).crop((left, top, left + R, top + R))
    return to_tensor(crop, flip)


@pytest.fixture
def wide_tall(tmp_path):
    """Row 0: jpg_0 wide 57 x 40, jpg_1 tall 40 x 57, label 0 (jpg_1 wins); resized 45 x 32 and 32 x 45."""
    wide, tall = noise((57, 40), 1), noise((40, 57), 2)
    path = tmp_path / "sizes.parquet"
    pq.write_table(
        pa.table({"caption": ["a"], "jpg_0": [png(wide)], "jpg_1": [png(tall)], "label_0": [0.0]}), path
    )
    return load_preference_table(str(path)), wide, tall


def test_sdxl_sizes_center_crop(wide_tall):
    table, wide, tall = wide_tall
    item = PreferencePairs(table, resolution=R)[(0, 5)]
    # original (h, w) before resizing; center crop: (45 - 32) / 2 = 6.5 rounds to 6 (as torchvision, diffusers)
    assert item["original_size"].tolist() == [[57, 40], [40, 57]]  # w = the tall jpg_1, l = the wide jpg_0
    assert item["crop_top_left"].tolist() == [[6, 0], [0, 6]]
    assert torch.equal(item["pixel_w"], expected_pixels(tall, (32, 45), 6, 0, False))
    assert torch.equal(item["pixel_l"], expected_pixels(wide, (45, 32), 0, 6, False))
    batch = collate_pairs([item, item])
    assert batch.sizes["original_size"].tolist() == [[57, 40], [57, 40], [40, 57], [40, 57]]  # [w; l]
    assert batch.sizes["crop_top_left"].shape == (4, 2) and batch.sizes["crop_top_left"].dtype == torch.long


def test_sdxl_sizes_flip_mirrors_left(wide_tall):
    table, wide, tall = wide_tall
    pairs = PreferencePairs(table, resolution=R, flip="pair")
    seeds = {bool(np.random.default_rng(s).random() < 0.5): s for s in range(20)}
    flipped, plain = pairs[(0, seeds[True])], pairs[(0, seeds[False])]
    # mirrored: left = resized width - left - resolution = 45 - 6 - 32 = 7 for the wide image
    assert flipped["crop_top_left"].tolist() == [[6, 0], [0, 7]]
    assert plain["crop_top_left"].tolist() == [[6, 0], [0, 6]]
    assert torch.equal(flipped["pixel_l"], expected_pixels(wide, (45, 32), 0, 6, True))
    assert torch.equal(flipped["pixel_l"], plain["pixel_l"].flip(-1))
    assert flipped["original_size"].tolist() == plain["original_size"].tolist() == [[57, 40], [40, 57]]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sdxl_sizes_random_crop_and_flip(wide_tall, seed):
    table, wide, tall = wide_tall
    item = PreferencePairs(table, resolution=R, random_crop=True, flip="independent")[(0, seed)]
    rng = np.random.default_rng(seed)  # the draws, in order: w's (left, top), l's (left, top), flip w, flip l
    left_w, top_w = int(rng.integers(0, 1)), int(rng.integers(0, 45 - R + 1))
    left_l, top_l = int(rng.integers(0, 45 - R + 1)), int(rng.integers(0, 1))
    flip_w, flip_l = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    assert item["crop_top_left"].tolist() == [
        [top_w, 32 - left_w - R if flip_w else left_w],
        [top_l, 45 - left_l - R if flip_l else left_l],
    ]
    assert torch.equal(item["pixel_w"], expected_pixels(tall, (32, 45), top_w, left_w, flip_w))
    assert torch.equal(item["pixel_l"], expected_pixels(wide, (45, 32), top_l, left_l, flip_l))


def test_sdxl_time_ids_read_the_batch_keys(wide_tall):
    from xdpo.models.families.sdxl import image_conditions

    table, _, _ = wide_tall
    batch = collate_pairs([PreferencePairs(table, resolution=R)[(0, 0)]])
    ids = image_conditions(None, 2, batch.pixel_size, batch.sizes)["time_ids"]
    assert ids.tolist() == [[57, 40, 6, 0, 32, 32], [40, 57, 0, 6, 32, 32]]


def test_kto_trains_on_per_image_data(tmp_path, tiny_pipeline_dir):
    """data.format=images + loss.objective=kto: a run on independent images (bright = desirable) trains,
    logs one row per step, and its weights change; implicit_acc is the fraction on the right side of z0."""
    from safetensors.torch import load_file

    from conftest import run_training

    labels = [1, 0] * 6
    path = kto_parquet(tmp_path / "kto.parquet", labels)
    out = run_training(
        tmp_path / "run", tiny_pipeline_dir, path,
        **{"data.format": "images", "loss.objective": "kto", "model.lora_rank": 4, "train.max_steps": 3,
           "train.checkpoint_every": 1, "train.batch_size": 4},
    )  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 <= r["implicit_acc"] <= 1 for r in rows)
    weights = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
