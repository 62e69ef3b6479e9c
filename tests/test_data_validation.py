"""Bad input, class by class: one line naming file, row, column and what was expected; or skip and report."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xdpo.config import load_config
from xdpo.data import (
    MIN_IMAGE_SIDE,
    PreferencePairs,
    collate_pairs,
    load_preference_table,
    validate_pairs,
)
from xdpo.data.transforms import decode_image
from xdpo.errors import BadRowError, ConfigError, DataError


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def solid(value: int, size: tuple[int, int] = (16, 16)) -> bytes:
    return png(Image.new("RGB", size, (value, value, value)))


GOOD_0, GOOD_1 = solid(200), solid(40)


def write(path, captions, labels, jpg_0=None, jpg_1=None, **extra) -> str:
    n = len(labels)
    columns = {
        "caption": captions,
        "jpg_0": jpg_0 if jpg_0 is not None else [GOOD_0] * n,
        "jpg_1": jpg_1 if jpg_1 is not None else [GOOD_1] * n,
        "label_0": labels,
        **extra,
    }
    pq.write_table(pa.table(columns), path)
    return str(path)


def open_pairs(path: str, **kw) -> PreferencePairs:
    return PreferencePairs(load_preference_table(path), resolution=8, source=path, **kw)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("bad", [2.0, 0.7, -1.0, None, float("nan")])
def test_label_outside_the_three_values(tmp_path, bad):
    path = write(tmp_path / "l.parquet", list("abcd"), [1.0, 0.0, bad, 1.0])
    with pytest.raises(
        BadRowError, match=r"l.parquet: row 2, column label_0: expected 0, 0.5 or 1, got"
    ) as e:
        open_pairs(path)
    assert e.value.row == 2 and e.value.column == "label_0" and "on_bad_row=skip" in one_line(e)
    with pytest.raises(BadRowError, match="row 2, column label_0"):
        validate_pairs(load_preference_table(path), source=path)
    pairs = open_pairs(path, on_bad_row="skip")
    assert (pairs.n_bad, len(pairs), [pairs[(i, 0)]["row"] for i in range(3)]) == (1, 3, [0, 1, 3])
    report = validate_pairs(load_preference_table(path), source=path, on_bad_row="skip")
    assert report.bad_rows == [2] and "label_0: 1 (rows 2)" in report.summary()


# ------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_empty_or_missing_caption(tmp_path, bad):
    path = write(tmp_path / "c.parquet", ["a", bad, "c"], [1.0, 0.0, 1.0])
    with pytest.raises(BadRowError, match=r"c.parquet: row 1, column caption: expected a non-empty caption"):
        open_pairs(path)
    pairs = open_pairs(path, on_bad_row="skip")
    assert [pairs[(i, 0)]["row"] for i in range(len(pairs))] == [0, 2]


def test_caption_column_that_is_not_text(tmp_path):
    path = write(tmp_path / "n.parquet", [1, 2], [1.0, 0.0])
    with pytest.raises(BadRowError, match="row 0, column caption: expected a non-empty caption.*got 1 "):
        open_pairs(path)


# ------------------------------------------------------------------------------------------- images


def test_missing_image_found_without_decoding(tmp_path):
    path = write(tmp_path / "m.parquet", list("abc"), [1.0, 0.0, 1.0], jpg_1=[GOOD_1, None, b""])
    report = validate_pairs(load_preference_table(path), source=path, on_bad_row="skip")
    assert report.bad_rows == [1, 2] and {report.bad[r].column for r in (1, 2)} == {"jpg_1"}
    assert "got no image" in str(report.bad[1])


def test_undecodable_image_error_skip_and_up_front(tmp_path):
    path = write(
        tmp_path / "u.parquet", list("abcd"), [1.0, 0.0, 0.0, 1.0], jpg_1=[GOOD_1, GOOD_1, b"junk", GOOD_1]
    )
    with pytest.raises(BadRowError, match=r"u.parquet: row 2, column jpg_1: .*cannot decode image") as e:
        open_pairs(path)[(2, 0)]
    one_line(e)
    cheap = validate_pairs(load_preference_table(path), source=path)  # no decoding: not found, and said so
    assert cheap.ok and "images not decoded" in cheap.summary()
    with pytest.raises(BadRowError, match="row 2, column jpg_1"):
        validate_pairs(load_preference_table(path), source=path, decode_images=True)
    full = validate_pairs(load_preference_table(path), source=path, decode_images=True, on_bad_row="skip")
    assert full.bad_rows == [2]
    # the report's rows can be left out up front ...
    assert [p["row"] for p in map(open_pairs(path, bad_rows=full.bad_rows).__getitem__, range(3))] == [
        0,
        1,
        3,
    ]


def test_undecodable_image_mid_run_is_replaced_by_the_next_good_pair(tmp_path):
    """... or found mid-run: with skip the item is the next decodable pair, the same in every process."""
    jpg_0 = [GOOD_0, GOOD_0, b"junk", GOOD_0, b"junk"]
    path = write(tmp_path / "s.parquet", [f"c{i}" for i in range(5)], [1.0] * 5, jpg_0=jpg_0)
    pairs = open_pairs(path, on_bad_row="skip")
    item, nxt = pairs[(2, 7)], pairs[(3, 7)]
    assert (item["row"], item["skipped_rows"], nxt["skipped_rows"]) == (3, [2], [])
    assert torch.equal(item["pixel_w"], nxt["pixel_w"]) and item["caption"] == "c3"
    assert open_pairs(path, on_bad_row="skip")[(2, 7)]["row"] == 3  # a fresh copy (another worker) agrees
    assert pairs[(4, 0)]["row"] == 0 and pairs[(4, 0)]["skipped_rows"] == [4]  # wraps around
    batch = collate_pairs([pairs[(i, 0)] for i in range(5)])
    assert batch.rows.tolist() == [0, 1, 3, 3, 0] and sorted(set(batch.skipped_rows)) == [2, 4]
    assert pairs.skipped == {2, 4}
    every = write(tmp_path / "all.parquet", ["a"], [1.0], jpg_0=[b"junk"])
    with pytest.raises(DataError, match="no pair has two decodable images"):
        open_pairs(every, on_bad_row="skip")[(0, 0)]


@pytest.mark.parametrize("size", [(4, 16), (16, 7), (1, 1)])
def test_tiny_images_are_bad(tmp_path, size):
    path = write(tmp_path / "t.parquet", ["a", "b"], [1.0, 1.0], jpg_1=[GOOD_1, solid(0, size)])
    w, h = size
    with pytest.raises(
        BadRowError,
        match=rf"row 1, column jpg_1: expected .* at least 8x8 pixels, got an image of {w}x{h} pixels",
    ):
        open_pairs(path)[(1, 0)]
    assert open_pairs(path, on_bad_row="skip")[(1, 0)]["row"] == 0
    report = validate_pairs(load_preference_table(path), source=path, decode_images=True, on_bad_row="skip")
    assert report.bad_rows == [1]
    ok = write(tmp_path / "ok.parquet", ["a"], [1.0], jpg_1=[solid(0, (MIN_IMAGE_SIDE, 300))])
    assert open_pairs(ok)[(0, 0)]["pixel_l"].shape == (3, 8, 8)


def _modes() -> dict[str, tuple[bytes, float]]:
    """Encoded images in other modes, with the grey level (0..255) they must decode to."""
    grey16 = Image.fromarray(np.full((16, 16), 32896, np.uint16))  # 128 * 257
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([100, 100, 100] * 256)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    return {
        "CMYK": (png(Image.new("CMYK", (16, 16), (0, 0, 0, 127)), "JPEG"), 128),
        "RGBA": (png(Image.new("RGBA", (16, 16), (90, 90, 90, 0))), 90),
        "LA": (png(Image.new("LA", (16, 16), (70, 255))), 70),
        "L": (png(Image.new("L", (16, 16), 50)), 50),
        "1": (png(Image.new("1", (16, 16), 1)), 255),
        "I;16": (png(grey16), 128),
        "P": (png(palette), 100),
        "P+transparency": (png(transparent), 100),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_other_image_modes_are_converted_never_an_error(tmp_path, mode):
    data, grey = _modes()[mode]
    path = write(tmp_path / "m.parquet", ["a"], [1.0], jpg_0=[data])
    report = validate_pairs(load_preference_table(path), source=path, decode_images=True)
    assert report.ok
    pixel = open_pairs(path)[(0, 0)]["pixel_w"]
    assert pixel.shape == (3, 8, 8)
    assert ((pixel + 1) * 127.5).mean().item() == pytest.approx(grey, abs=2)


def test_16_bit_grey_is_scaled_not_clipped_to_white():
    ramp = Image.fromarray(np.arange(256, dtype=np.uint16)[None].repeat(8, 0) * 257)
    out = np.asarray(decode_image(png(ramp)))[0, :, 0]
    assert np.abs(out.astype(int) - np.arange(256)).max() <= 1


# ------------------------------------------------------------------------------------------- columns, files


def test_missing_column_stops_even_with_skip(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [GOOD_0], "label_0": [1.0]}), path)
    with pytest.raises(DataError, match=r"x.parquet: missing column\(s\) jpg_1"):
        load_preference_table(str(path))
    import datasets

    table = datasets.Dataset.from_dict({"caption": ["a"], "jpg_0": [GOOD_0], "label_0": [1.0]})
    for kw in ({}, {"on_bad_row": "skip"}):
        with pytest.raises(DataError, match=r"mem: missing column\(s\) jpg_1"):
            validate_pairs(table, source="mem", **kw)
    with pytest.raises(ConfigError, match="data.on_bad_row"):
        validate_pairs(table, on_bad_row="ignore")


def test_bad_row_in_a_folder_names_its_file_and_row_within_it(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d" / "a.parquet", list("abc"), [1.0, 0.0, 1.0])
    write(tmp_path / "d" / "b.parquet", list("de"), [0.0, 7.0])
    folder = str(tmp_path / "d")
    with pytest.raises(
        BadRowError, match=r"d/b.parquet: row 1 \(row 4 of .*d\), column label_0: .* got 7.0"
    ) as e:
        open_pairs(folder)
    assert e.value.row == 4


# ------------------------------------------------------------------------------------------- repeated rows


def test_repeated_rows_are_counted_and_kept(tmp_path):
    other = solid(120)
    jpg_0 = [GOOD_0, GOOD_0, GOOD_1, GOOD_0, GOOD_0]
    jpg_1 = [GOOD_1, GOOD_1, GOOD_0, other, GOOD_1]
    captions = ["a", "a", "a", "a", "b"]  # row 1 repeats row 0; row 2 is row 0 with its images swapped
    path = write(tmp_path / "r.parquet", captions, [1.0, 0.0, 1.0, 1.0, 1.0], jpg_0=jpg_0, jpg_1=jpg_1)
    report = validate_pairs(load_preference_table(path), source=path)
    assert report.ok and (report.n_duplicates, report.duplicate_rows) == (2, [1, 2])
    assert "2 rows repeat an earlier row's caption and images (kept; rows 1, 2)" in report.summary()
    assert len(open_pairs(path)) == 5  # never left out
    # with uid columns the images are not read: the uids decide
    uids = write(
        tmp_path / "u.parquet",
        ["a", "a"],
        [1.0, 1.0],
        jpg_1=[GOOD_1, other],
        image_0_uid=["x", "x"],
        image_1_uid=["y", "y"],
    )
    assert validate_pairs(load_preference_table(uids), source=uids).n_duplicates == 1
    assert validate_pairs(load_preference_table(uids), source=uids, decode_images=True).n_duplicates == 1
    assert validate_pairs(load_preference_table(path), source=path, duplicates=False).n_duplicates == 0


# ------------------------------------------------------------------------------------------- config and CLI


def test_on_bad_row_config_key(tmp_path):
    assert load_config(None, ["model.pretrained=m", "data.path=d"]).data.on_bad_row == "error"
    assert (
        load_config(None, ["model.pretrained=m", "data.path=d", "data.on_bad_row=skip"]).data.on_bad_row
        == "skip"
    )
    with pytest.raises(ConfigError, match="data.on_bad_row"):
        load_config(None, ["model.pretrained=m", "data.path=d", "data.on_bad_row=warn"])
    with pytest.raises(ConfigError, match="data.ties"):
        load_config(None, ["model.pretrained=m", "data.path=d", "data.ties=keep", "loss.objective=kto"])


def test_train_stops_on_a_bad_row_with_one_line(tmp_path, capsys, tiny_pipeline_dir):
    from xdpo.cli import main

    path = write(tmp_path / "bad.parquet", ["a", "b", "c"], [1.0, 2.0, 0.0])
    rc = main(
        [
            "train",
            f"model.pretrained={tiny_pipeline_dir}",
            f"data.path={path}",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert (
        err.startswith("xdpo train: error: ")
        and "bad.parquet: row 1, column label_0: expected 0, 0.5 or 1" in err
    )
