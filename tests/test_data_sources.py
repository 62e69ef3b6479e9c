"""Other sources: data.columns (chosen/rejected), image storage (Image feature, {bytes, path}, relative
paths), json/csv files and streaming with data.max_pairs."""

from __future__ import annotations

import io
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xdpo.config import dump_yaml, load_config
from xdpo.data import PreferencePairs, collate_pairs, load_preference_table, open_pair_data, validate_pairs
from xdpo.errors import ConfigError, DataError

RED, BLUE = (220, 30, 30), (30, 30, 220)


def png(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def red(pixel: torch.Tensor) -> bool:
    return bool(pixel[0].mean() > pixel[2].mean())


def cfg_for(path, *overrides):
    return load_config(None, ["model.pretrained=m", f"data.path={path}", "data.resolution=16", *overrides])


def chosen_rejected(path, n=4):
    pq.write_table(
        pa.table(
            {"prompt": [f"p{i}" for i in range(n)], "chosen": [png(RED)] * n, "rejected": [png(BLUE)] * n}
        ),
        path,
    )
    return path


# ------------------------------------------------------------------------------------------- data.columns


def test_chosen_rejected_parquet_with_columns_from_yaml_and_command_line(tmp_path):
    path = chosen_rejected(tmp_path / "cr.parquet")
    f = tmp_path / "c.yaml"
    f.write_text(
        f"model:\n  pretrained: m\ndata:\n  path: {path}\n  resolution: 16\n"
        "  columns:\n    caption: prompt\n    jpg_0: chosen\n    jpg_1: rejected\n"
    )
    cfg = load_config(f)
    assert cfg.data.columns == {"caption": "prompt", "jpg_0": "chosen", "jpg_1": "rejected"}
    assert (
        cfg_for(path, "data.columns=caption:prompt,jpg_0:chosen,jpg_1:rejected").data.columns
        == cfg.data.columns
    )
    dump_yaml(cfg, tmp_path / "resolved.yaml")  # a run's config.yaml loads again (resume)
    assert load_config(tmp_path / "resolved.yaml").data.columns == cfg.data.columns
    _, pairs, n = open_pair_data(cfg)
    assert n == 4 and pairs.labels.tolist() == [1.0] * 4  # no label column: the first image is preferred
    batch = collate_pairs([pairs[(i, 0)] for i in range(4)])
    assert all(red(p) for p in batch.pixels[:4]) and batch.captions == ["p0", "p1", "p2", "p3"]


def test_columns_errors_name_the_missing_column_and_the_mapping(tmp_path):
    path = chosen_rejected(tmp_path / "cr.parquet")
    with pytest.raises(
        DataError,
        match=r"cr.parquet: missing column\(s\) text named by data.columns=caption:text,jpg_0:chosen,"
        r"jpg_1:rejected \(mapped: text \(data.columns caption:text\); .*found: prompt, chosen, rejected\)",
    ):
        load_preference_table(str(path), columns={"caption": "text", "jpg_0": "chosen", "jpg_1": "rejected"})
    with pytest.raises(
        DataError, match=r"missing column\(s\) caption, jpg_0, jpg_1; .* data.columns=caption:prompt"
    ):
        load_preference_table(str(path))
    with pytest.raises(DataError, match=r"missing column\(s\) score named by data.columns=.*label_0:score"):
        load_preference_table(
            str(path),
            columns={"caption": "prompt", "jpg_0": "chosen", "jpg_1": "rejected", "label_0": "score"},
        )
    with pytest.raises(ConfigError, match="data.columns: jpg_0 and jpg_1 both read column 'chosen'"):
        load_preference_table(str(path), columns={"caption": "prompt", "jpg_0": "chosen", "jpg_1": "chosen"})
    with pytest.raises(ConfigError, match="config key `data.columns`: unknown name.* prompt"):
        cfg_for(path, "data.columns=prompt:caption")
    with pytest.raises(ConfigError, match="config key `data.columns`: expected NAME:COLUMN pairs"):
        cfg_for(path, "data.columns=caption")


def test_bad_row_named_by_the_data_own_column(tmp_path):
    path = tmp_path / "cr.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "good": [png(RED)] * 2, "bad": [png(BLUE), b""]}), path)
    columns = {"caption": "prompt", "jpg_0": "good", "jpg_1": "bad"}
    with pytest.raises(
        DataError, match=r"cr.parquet: row 1, column bad \(jpg_1\): expected an encoded image"
    ):
        PreferencePairs(
            load_preference_table(str(path), columns=columns), resolution=8, source=str(path), columns=columns
        )


def test_mapping_renames_past_a_column_with_an_xdpo_name(tmp_path):
    """A dataset whose own `jpg_0` is not the image to use: the mapped column replaces it; a swap works."""
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {"caption": ["a"], "jpg_0": [png(BLUE)], "jpg_1": [png(RED)], "alt": [png(RED)], "label_0": [1.0]}
        ),
        path,
    )
    swapped = load_preference_table(str(path), columns={"jpg_0": "jpg_1", "jpg_1": "jpg_0"})
    assert red(PreferencePairs(swapped, resolution=8)[(0, 0)]["pixel_w"])
    replaced = load_preference_table(str(path), columns={"jpg_0": "alt"})
    assert (
        red(PreferencePairs(replaced, resolution=8)[(0, 0)]["pixel_w"]) and "alt" not in replaced.column_names
    )


# ------------------------------------------------------------------------------------------ image storage


def test_image_feature_in_a_save_to_disk_folder(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"caption": ["a", "b"], "jpg_0": [Image.new("RGB", (20, 12), RED)] * 2,
         "jpg_1": [Image.new("RGB", (20, 12), BLUE)] * 2, "label_0": [0.0, 1.0]},
        features=datasets.Features(
            {"caption": datasets.Value("string"), "jpg_0": datasets.Image(), "jpg_1": datasets.Image(),
             "label_0": datasets.Value("float64")}
        ),
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "saved"))
    pairs = PreferencePairs(load_preference_table(str(tmp_path / "saved")), resolution=8)
    assert [red(pairs[(i, 0)]["pixel_w"]) for i in range(2)] == [False, True]
    assert pairs[(0, 0)]["original_size"].tolist() == [[12, 20], [12, 20]]


def test_bytes_path_dicts_and_relative_paths(tmp_path):
    """{bytes, path} dicts (bytes used; only a path: read from the file), and plain path strings,
    relative to the parquet file's folder or to the data root; a missing file names row and column."""
    root = tmp_path / "data"
    (root / "shard" / "img").mkdir(parents=True)
    (root / "common").mkdir()
    (root / "shard" / "img" / "r.png").write_bytes(png(RED))
    (root / "common" / "b.png").write_bytes(png(BLUE))
    dicts = root / "shard" / "dicts.parquet"
    pq.write_table(
        pa.table({
            "caption": ["a", "b", "c"],
            "jpg_0": [{"bytes": png(RED), "path": "x.png"}, {"bytes": None, "path": "img/r.png"},
                      {"bytes": None, "path": str(root / "shard" / "img" / "r.png")}],
            "jpg_1": [{"bytes": png(BLUE), "path": None}] * 3,
            "label_0": [1.0, 1.0, 1.0],
        }),
        dicts,
    )  # fmt: skip
    pairs = PreferencePairs(load_preference_table(str(dicts)), resolution=8, source=str(dicts))
    assert all(red(pairs[(i, 0)]["pixel_w"]) for i in range(3))
    root = tmp_path / "data2"
    (root / "shard" / "img").mkdir(parents=True)
    (root / "common").mkdir()
    (root / "shard" / "img" / "r.png").write_bytes(png(RED))
    (root / "common" / "b.png").write_bytes(png(BLUE))
    strings = root / "shard" / "paths.parquet"
    pq.write_table(
        pa.table({"caption": ["a", "b"], "jpg_0": ["img/r.png", "img/r.png"], "jpg_1": ["common/b.png", "nope.png"],
                  "label_0": [0.0, 0.0]}),
        strings,
    )  # fmt: skip
    for source in (
        str(root),
        str(root / "*" / "paths.parquet"),
    ):  # a folder, a glob: relative to the data root
        pairs = PreferencePairs(
            load_preference_table(source), resolution=8, source=source, on_bad_row="error"
        )
        assert not red(pairs[(0, 0)]["pixel_w"])  # label 0: jpg_1 (blue, common/b.png) wins
    with pytest.raises(
        DataError, match=r"paths.parquet: row 1, column jpg_1: .*got no image \(missing image file 'nope.png'"
    ):
        pairs[(1, 0)]
    report = validate_pairs(
        load_preference_table(str(root)), source=str(root), decode_images=True, on_bad_row="skip"
    )
    assert report.bad_rows == [1] and "nope.png" in str(report.bad[1])
    alone = validate_pairs(
        load_preference_table(str(strings)), source=str(strings), decode_images=True, on_bad_row="skip"
    )
    assert alone.bad_rows == [0, 1]  # a single file's root is its folder: common/b.png is not there


def test_json_and_csv_files(tmp_path):
    (tmp_path / "r.png").write_bytes(png(RED))
    (tmp_path / "b.png").write_bytes(png(BLUE))
    rows = [{"prompt": "a", "chosen": "r.png", "rejected": "b.png"}] * 2
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("caption,jpg_0,jpg_1,label_0\nx,b.png,r.png,0\n")
    columns = {"caption": "prompt", "jpg_0": "chosen", "jpg_1": "rejected"}
    jsonl = str(tmp_path / "d.jsonl")
    assert red(
        PreferencePairs(load_preference_table(jsonl, columns=columns), resolution=8, source=jsonl)[(0, 0)][
            "pixel_w"
        ]
    )
    csv = str(tmp_path / "d.csv")
    assert red(PreferencePairs(load_preference_table(csv), resolution=8, source=csv)[(0, 0)]["pixel_w"])


# ------------------------------------------------------------------------------------------- streaming


def stream_files(tmp_path):
    """Two json-lines files: 6 rows (a tie at row 1, a bad label at row 3), then a file that is not JSON."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.png").write_bytes(png(RED))
    (tmp_path / "img" / "b.png").write_bytes(png(BLUE))
    labels = [1, 0.5, 0, 2, 1, 0]
    rows = [
        {"text": f"t{i}", "a": "img/r.png", "b": "img/b.png", "pref": lab} for i, lab in enumerate(labels)
    ]
    (tmp_path / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "part-1.jsonl").write_text("this is not json\n" * 10)
    return f"{tmp_path / 'part-0.jsonl'},{tmp_path / 'part-1.jsonl'}"


COLUMNS = "data.columns=caption:text,jpg_0:a,jpg_1:b,label_0:pref"


def test_streaming_reads_only_the_first_usable_rows(tmp_path, monkeypatch):
    path = str(tmp_path / "part-*.jsonl")
    stream_files(tmp_path)
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    cfg = cfg_for(path, COLUMNS, "data.streaming=true", "data.max_pairs=2")
    table, pairs, n = open_pair_data(cfg)
    assert calls[0][0] == ("json",) and calls[0][1]["streaming"] is True
    assert n == 2 and table["__row__"] == [0, 2]  # the tie (row 1) dropped, never the unread file
    assert [red(pairs[(i, 0)]["pixel_w"]) for i in range(2)] == [True, False]
    assert len(open_pair_data(cfg)[0]) == 2 and len(calls) == 1  # read again from the datasets cache
    keep = cfg_for(path, COLUMNS, "data.streaming=true", "data.max_pairs=2", "data.ties=keep")
    assert open_pair_data(keep)[0]["label_0"] == [1.0, 0.5]
    with pytest.raises(
        DataError,
        match=r"part-\*.jsonl \(streamed\): row 3, column pref \(label_0\): expected 0, 0.5 or 1, got 2",
    ):
        open_pair_data(cfg_for(path, COLUMNS, "data.streaming=true", "data.max_pairs=4"))
    skip = cfg_for(path, COLUMNS, "data.streaming=true", "data.max_pairs=3", "data.on_bad_row=skip")
    assert open_pair_data(skip)[0]["__row__"] == [0, 2, 4]
    with pytest.raises(DataError, match="cannot load json data"):
        load_preference_table(path, columns=dict(caption="text", jpg_0="a", jpg_1="b", label_0="pref"))
    with pytest.raises(ConfigError, match="data.max_pairs`: must be > 0 with data.streaming=true"):
        cfg_for(path, "data.streaming=true")


def test_streaming_a_hub_id_takes_the_same_path(tmp_path, monkeypatch):
    """A hub id goes to load_dataset(id, split=..., streaming=True); here it serves a local parquet."""
    path = chosen_rejected(tmp_path / "cr.parquet", n=5)
    calls = []
    real = datasets.load_dataset

    def fake(name, *args, **kw):
        calls.append((name, kw))
        if name == "someone/prefs":
            return real("parquet", data_files=[str(path)], split="train", streaming=kw["streaming"])
        return real(name, *args, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = cfg_for("someone/prefs", "data.columns=caption:prompt,jpg_0:chosen,jpg_1:rejected",
                  "data.streaming=true", "data.max_pairs=3", "data.split=validation")  # fmt: skip
    table, pairs, n = open_pair_data(cfg)
    assert calls[0] == ("someone/prefs", {"split": "validation", "streaming": True, "cache_dir": None})
    assert n == 3 and table["caption"] == ["p0", "p1", "p2"] and red(pairs[(0, 0)]["pixel_w"])
