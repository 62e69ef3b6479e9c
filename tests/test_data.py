"""Pick-a-Pic reader, pair transforms, collate and writer."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xdpo.data import PreferencePairs, collate_pairs, load_preference_table, write_pairs_parquet
from xdpo.data.transforms import decode_image, resized_size
from xdpo.errors import ConfigError, DataError


def solid(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


def gradient(size: tuple[int, int] = (64, 32), step: int = 4) -> Image.Image:
    """Grey image whose column x has value step * x."""
    w, h = size
    row = np.clip(np.arange(w) * step, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (h, 1))[..., None], 3, axis=2))


def half(size: tuple[int, int] = (24, 24), color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Left half `color`, right half black: a horizontal flip is visible."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = color
    return Image.fromarray(arr)


def table_of(images_0, images_1, labels, captions=None) -> datasets.Dataset:
    """An in-memory table in the Pick-a-Pic schema (PIL images become an `Image()` feature)."""
    captions = captions or [f"caption {i}" for i in range(len(labels))]
    return datasets.Dataset.from_dict(
        {"caption": captions, "jpg_0": images_0, "jpg_1": images_1, "label_0": labels}
    )


def flipped(pixels: torch.Tensor) -> bool:
    return bool(pixels[:, :, -1].mean() > pixels[:, :, 0].mean())


# ------------------------------------------------------------------------------------------------ sources


def test_load_single_file(pairs_parquet):
    table = load_preference_table(str(pairs_parquet))
    assert len(table) == 12
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "best_image_uid"} <= set(table.column_names)
    assert isinstance(table[0]["jpg_0"], bytes)


def test_load_glob_and_recursive_folder(tmp_path, make_pairs):
    make_pairs(tmp_path / "d" / "a.parquet", n=4, seed=1)
    make_pairs(tmp_path / "d" / "b.parquet", n=5, seed=2)
    make_pairs(tmp_path / "d" / "sub" / "c.parquet", n=3, seed=3)
    assert len(load_preference_table(str(tmp_path / "d" / "*.parquet"))) == 9
    assert len(load_preference_table(str(tmp_path / "d" / "**" / "*.parquet"))) == 12
    assert len(load_preference_table(str(tmp_path / "d"))) == 12
    with pytest.raises(DataError, match="no file matches"):
        load_preference_table(str(tmp_path / "nothing-*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.parquet files"):
        load_preference_table(str(tmp_path / "empty"))


def test_load_folder_with_split_names(tmp_path, make_pairs):
    make_pairs(tmp_path / "data" / "train-00000-of-00001.parquet", n=4)
    make_pairs(tmp_path / "data" / "validation-00000-of-00001.parquet", n=3, n_ties=0)
    assert len(load_preference_table(str(tmp_path))) == 4
    assert len(load_preference_table(str(tmp_path), split="validation")) == 3
    with pytest.raises(DataError, match="no split 'test'.*train, validation"):
        load_preference_table(str(tmp_path), split="test")


def test_load_save_to_disk_dataset_with_image_feature(tmp_path, pairs_parquet):
    table = datasets.Dataset.from_parquet(str(pairs_parquet)).cast_column("jpg_0", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    loaded = load_preference_table(str(tmp_path / "saved"))
    assert len(loaded) == 12
    assert loaded.features["jpg_0"] == datasets.Image(decode=False)  # not decoded at load
    item = PreferencePairs(loaded, resolution=16)[(0, 0)]
    assert item["pixel_w"].shape == (3, 16, 16)


def test_load_save_to_disk_dataset_dict_split(tmp_path, pairs_parquet):
    table = datasets.Dataset.from_parquet(str(pairs_parquet))
    datasets.DatasetDict({"train": table, "validation": table.select(range(5))}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(load_preference_table(str(tmp_path / "dd"))) == 12
    assert len(load_preference_table(str(tmp_path / "dd"), split="validation")) == 5
    with pytest.raises(DataError, match="no split 'test'; available splits: train, validation"):
        load_preference_table(str(tmp_path / "dd"), split="test")


@pytest.mark.parametrize("path", ["/no/such/dir/pairs.parquet", "nobody-xyz/no-such-dataset"])
def test_missing_path_or_offline_hub_id(path):
    with pytest.raises(DataError, match="neither a local parquet file.*nor a reachable or cached"):
        load_preference_table(path)


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "x.parquet").write_text("hello")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        load_preference_table(str(tmp_path / "x.parquet"))


# ------------------------------------------------------------------------------------------- validation


def test_missing_column_named(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "label_0": [1.0]}), path)
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) jpg_1;"):
        load_preference_table(str(path))
    table = datasets.Dataset.from_dict({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"]})
    with pytest.raises(DataError, match=r"mem: missing column\(s\) label_0"):
        PreferencePairs(table, resolution=8, source="mem")


@pytest.mark.parametrize("bad", [0.7, None, float("nan"), 2.0])
def test_bad_label_names_row(tmp_path, bad):
    labels = [1.0, 0.0, 0.5, bad, 1.0]
    path = tmp_path / "labels.parquet"
    img = b"not decoded at construction"
    pq.write_table(
        pa.table({"caption": list("abcde"), "jpg_0": [img] * 5, "jpg_1": [img] * 5, "label_0": labels}), path
    )
    table = load_preference_table(str(path))
    with pytest.raises(DataError, match=r"labels.parquet: row 3, column label_0: expected 0, 0.5 or 1, got"):
        PreferencePairs(table, resolution=8, source=str(path))


def test_text_labels_parsed_and_others_named_by_row():
    """Labels written as text (webdataset members, csv) are read as numbers; other text is a bad row."""
    img = solid((0, 0, 0))
    pairs = PreferencePairs(table_of([img] * 3, [img] * 3, ["1.0", " 0\n", "0.5"]), resolution=8, ties="keep")
    assert pairs.labels.tolist() == [1.0, 0.0, 0.5]
    table = table_of([img] * 2, [img] * 2, ["1", "yes"])
    with pytest.raises(DataError, match="mem: row 1, column label_0: expected 0, 0.5 or 1, got 'yes'"):
        PreferencePairs(table, resolution=8, source="mem")
    with pytest.raises(DataError, match="column label_0 has type list"):
        PreferencePairs(table_of([img], [img], [[1.0]]), resolution=8, source="mem")


def test_undecodable_image_names_row_and_column(tmp_path):
    good = write_pairs_parquet(tmp_path / "g.parquet", ["a"], [solid((1, 2, 3))], [solid((4, 5, 6))], [1.0])
    png = pq.read_table(good)["jpg_0"][0].as_py()
    path = tmp_path / "broken.parquet"
    jpg_1 = [png, png, b"\x89PNG garbage", png]
    pq.write_table(
        pa.table(
            {"caption": list("abcd"), "jpg_0": [png] * 4, "jpg_1": jpg_1, "label_0": [1.0, 0.0, 0.0, 1.0]}
        ),
        path,
    )
    pairs = PreferencePairs(load_preference_table(str(path)), resolution=8, source=str(path))
    pairs[(1, 0)]  # rows around it are fine
    with pytest.raises(
        DataError,
        match=r"broken.parquet: row 2, column jpg_1: expected an encoded image .*cannot decode image: .+\)$",
    ):
        pairs[(2, 0)]


def test_bad_config_values():
    table = table_of([solid((0, 0, 0))], [solid((0, 0, 0))], [1.0])
    with pytest.raises(ConfigError, match="data.ties"):
        PreferencePairs(table, resolution=8, ties="win")
    with pytest.raises(ConfigError, match="data.flip"):
        PreferencePairs(table, resolution=8, flip="vertical")
    with pytest.raises(ConfigError, match="data.prompt_dropout"):
        PreferencePairs(table, resolution=8, prompt_dropout=1.5)


# ------------------------------------------------------------------------------------------- pairs


def test_ties_dropped_by_default_and_kept_on_request(pairs_parquet):
    table = load_preference_table(str(pairs_parquet))
    tie_rows = [i for i, x in enumerate(table["label_0"]) if x == 0.5]
    assert len(tie_rows) == 1
    dropped = PreferencePairs(table, resolution=16)
    assert (dropped.n_ties, dropped.n_dropped, dropped.n_pairs, len(dropped)) == (1, 1, 11, 11)
    rows = [dropped[(i, 0)]["row"] for i in range(len(dropped))]
    assert tie_rows[0] not in rows and sorted(rows) == rows
    assert all(dropped[(i, 0)]["label_w"] == 1.0 for i in range(len(dropped)))
    kept = PreferencePairs(table, resolution=16, ties="keep")
    assert (kept.n_ties, kept.n_dropped, len(kept)) == (1, 0, 12)
    assert kept[(tie_rows[0], 0)]["label_w"] == 0.5


def test_winner_first():
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    table = table_of([red] * 4, [blue] * 4, [1.0, 0.0, 0.5, 0.0])
    pairs = PreferencePairs(table, resolution=8, ties="keep")
    expected_w = ["red", "blue", "red", "blue"]  # the tie keeps jpg_0 first
    for i, colour in enumerate(expected_w):
        item = pairs[(i, 0)]
        red_w = item["pixel_w"][0].mean() > 0.99 and item["pixel_w"][2].mean() < -0.99
        red_l = item["pixel_l"][0].mean() > 0.99 and item["pixel_l"][2].mean() < -0.99
        assert red_w == (colour == "red") and red_l == (colour != "red")
        assert item["label_w"] == (0.5 if i == 2 else 1.0)


def test_fixture_winner_is_brighter(pairs_parquet):
    pairs = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=16)
    margins = [
        float(it["pixel_w"].mean() - it["pixel_l"].mean())
        for it in (pairs[(i, 0)] for i in range(len(pairs)))
    ]
    assert min(margins) > 0.3


def test_resize_center_crop_shape_range_and_geometry(pairs_parquet):
    assert resized_size(40, 36, 16) == (17, 16)  # longer side truncated, as torchvision
    assert resized_size(20, 50, 10) == (10, 25)
    item = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=16)[(0, 0)]
    for key in ("pixel_w", "pixel_l"):
        assert item[key].shape == (3, 16, 16) and item[key].dtype == torch.float32
        assert item[key].min() >= -1.0 and item[key].max() <= 1.0
    # 64x32 gradient (value 4x) -> 32x16 (value ~ 8j + 2) -> centre crop columns 8..23
    table = table_of([gradient()], [gradient()], [1.0])
    pixel = PreferencePairs(table, resolution=16)[(0, 0)]["pixel_w"]
    expected = (8 * np.arange(8, 24) + 2) / 127.5 - 1
    assert np.allclose(pixel[0, 8].numpy(), expected, atol=0.02)


def test_random_crop_shared_by_the_pair():
    table = table_of([gradient()], [gradient()], [1.0])
    pairs = PreferencePairs(table, resolution=16, random_crop=True)
    firsts = set()
    for seed in range(30):
        item = pairs[(0, seed)]
        assert torch.equal(item["pixel_w"], item["pixel_l"])
        firsts.add(round(float(item["pixel_w"][0, 0, 0]), 3))
    assert len(firsts) >= 5


def test_flip_modes():
    table = table_of([half(color=(255, 255, 255))], [half(color=(255, 0, 0))], [1.0])
    seen = {}
    for mode in ("none", "pair", "independent"):
        pairs = PreferencePairs(table, resolution=24, flip=mode)
        seen[mode] = {
            (flipped(it["pixel_w"]), flipped(it["pixel_l"])) for it in (pairs[(0, s)] for s in range(40))
        }
        a, b = pairs[(0, 7)], pairs[(0, 7)]
        assert torch.equal(a["pixel_w"], b["pixel_w"]) and torch.equal(a["pixel_l"], b["pixel_l"])
    assert seen["none"] == {(False, False)}
    assert seen["pair"] == {(False, False), (True, True)}
    assert seen["independent"] == {(False, False), (True, True), (False, True), (True, False)}


def test_prompt_dropout_rate(pairs_parquet):
    table = load_preference_table(str(pairs_parquet))
    pairs = PreferencePairs(table, resolution=8, prompt_dropout=0.25)
    captions = [pairs[(s % len(pairs), s)]["caption"] for s in range(400)]
    rate = sum(c == "" for c in captions) / len(captions)
    assert 0.18 < rate < 0.32
    assert all(c.startswith("a bright picture") for c in captions if c)
    assert pairs[(3, 11)]["caption"] == pairs[(3, 11)]["caption"]
    never = PreferencePairs(table, resolution=8)
    assert all(never[(0, s)]["caption"] for s in range(50))


def test_collate_shapes(pairs_parquet):
    pairs = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=16, ties="keep")
    batch = collate_pairs([pairs[(i, i)] for i in range(4)])
    assert batch.pairs and batch.pixels.shape == (8, 3, 16, 16)  # [w; l]
    assert torch.equal(batch.pixels[:4], torch.stack([pairs[(i, i)]["pixel_w"] for i in range(4)]))
    assert torch.equal(batch.pixels[4:], torch.stack([pairs[(i, i)]["pixel_l"] for i in range(4)]))
    assert batch.label.dtype == torch.float32 and batch.label.shape == (4,)
    tie = [i for i in range(4) if pairs[(i, 0)]["label_w"] == 0.5]
    assert batch.label.tolist() == [0.5 if i in tie else 1.0 for i in range(4)]  # the loss's `label`
    assert batch.skipped_rows == []
    assert batch.rows.dtype == torch.long and batch.rows.tolist() == [0, 1, 2, 3]
    assert len(batch.captions) == 4 and batch.pixel_size == (16, 16)


def test_loads_through_a_dataloader(pairs_parquet):
    pairs = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=16)
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=3, sampler=[(i, 100 + i) for i in range(6)], collate_fn=collate_pairs
    )
    assert [b.groups for b in loader] == [3, 3]


# ------------------------------------------------------------------------------------------- writer


def test_write_pairs_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(6)]
    path = write_pairs_parquet(
        tmp_path / "out" / "p.parquet",
        ["a", "b", "c"],
        imgs[:3],
        imgs[3:],
        [1.0, 0.0, 0.5],
        extra={"uid": [7, 8, 9]},
    )
    table = pq.read_table(path)
    assert table.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "uid"]
    assert table["label_1"].to_pylist() == [0.0, 1.0, 0.5] and table["uid"].to_pylist() == [7, 8, 9]
    assert table.schema.field("jpg_0").type == pa.binary()
    for i in range(3):
        assert np.array_equal(np.asarray(decode_image(table["jpg_1"][i].as_py())), np.asarray(imgs[3 + i]))
    jpeg = write_pairs_parquet(tmp_path / "j.parquet", ["a"], imgs[:1], imgs[1:2], [1.0], image_format="JPEG")
    assert pq.read_table(jpeg)["jpg_0"][0].as_py()[:2] == b"\xff\xd8"


def test_write_pairs_checks_lengths_and_labels(tmp_path):
    img = solid((0, 0, 0))
    with pytest.raises(DataError, match="jpg_1 has 1"):
        write_pairs_parquet(tmp_path / "x.parquet", ["a", "b"], [img, img], [img], [1.0, 0.0])
    with pytest.raises(DataError, match="extra has|best has 1"):
        write_pairs_parquet(
            tmp_path / "x.parquet", ["a", "b"], [img] * 2, [img] * 2, [1.0, 0.0], extra={"best": [1]}
        )
    with pytest.raises(DataError, match="row 1, column label_0"):
        write_pairs_parquet(tmp_path / "x.parquet", ["a", "b"], [img] * 2, [img] * 2, [1.0, 0.3])
