"""Webdataset tar shards: index once, read members by offset, bad rows named by shard and sample key."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xdpo.data import PreferencePairs, collate_pairs, load_preference_table, tarshards, validate_pairs
from xdpo.errors import DataError

RED, BLUE = (220, 30, 30), (30, 30, 220)


def encoded(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    """A shard laid out as webdataset's TarWriter writes it: per sample, members KEY.FIELD in sorted
    field order, USTAR headers, mode 0o444, user/group "bigdata"; text members UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            key = sample["__key__"]
            for field in sorted(k for k in sample if k != "__key__"):
                value = sample[field]
                data = value.encode("utf-8") if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mode, info.mtime = len(data), 0o444, 1_700_000_000
                info.uname = info.gname = "bigdata"
                tf.addfile(info, io.BytesIO(data))
    return path


def pair_sample(key: str, label: str, **extra) -> dict[str, bytes | str]:
    """jpg_0 red (PNG), jpg_1 blue (JPEG); the winner by `label` ("1.0": jpg_0)."""
    sample = {
        "__key__": key,
        "caption": f"a picture {key}",
        "jpg_0": encoded(RED, fmt="PNG"),
        "jpg_1": encoded(BLUE),
        "label_0": label,
        "label_1": str(1 - float(label)),
        "best_image_uid": f"uid-{key}",
    }
    sample.update(extra)
    return sample


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two shards, 3 + 2 samples; sample 000002 is a tie."""
    folder = tmp_path / "shards"
    labels = ["1.0", "0.0", "0.5", "0.0", "1.0"]
    samples = [pair_sample(f"{i:06d}", lab) for i, lab in enumerate(labels)]
    write_shard(folder / "pickapic-00000.tar", samples[:3])
    write_shard(folder / "pickapic-00001.tar", samples[3:])
    return folder


def red(pixel: torch.Tensor) -> bool:
    return bool(pixel[0].mean() > pixel[2].mean())


def test_folder_glob_list_and_range_read_the_same_samples(shards):
    names = [shards / "pickapic-00000.tar", shards / "pickapic-00001.tar"]
    for path in (
        str(shards),
        str(shards / "*.tar"),
        ",".join(map(str, names)),
        str(shards / "pickapic-{00000..00001}.tar"),
    ):
        table = load_preference_table(path)
        assert table["__key__"] == [f"{i:06d}" for i in range(5)], path
        assert table["__url__"] == [str(names[0].resolve())] * 3 + [str(names[1].resolve())] * 2
    assert load_preference_table(str(names[1]))["__key__"] == ["000003", "000004"]
    assert (
        table["label_0"] == ["1.0", "0.0", "0.5", "0.0", "1.0"] and table["caption"][1] == "a picture 000001"
    )
    with pytest.raises(DataError, match="no-such-00002.tar: no such tar shard"):
        load_preference_table(f"{names[0]},{shards / 'no-such-00002.tar'}")


def test_pairs_winner_first_ties_and_members_read_by_offset(shards):
    table = load_preference_table(str(shards))
    ref = table[1]["jpg_1"]
    assert set(ref) == {"offset", "size"}
    with open(table[1]["__url__"], "rb") as f:
        f.seek(ref["offset"])
        assert f.read(ref["size"]) == encoded(BLUE)  # the member's bytes, read in place
    pairs = PreferencePairs(table, resolution=16, source=str(shards))
    assert pairs.n_ties == 1 and len(pairs) == 4 and pairs.rows.tolist() == [0, 1, 3, 4]
    batch = collate_pairs([pairs[(i, 0)] for i in range(4)])
    assert [red(p) for p in batch.pixels[:4]] == [True, False, False, True]  # label 0: jpg_1 (blue) wins
    assert batch.label.tolist() == [1.0] * 4
    kept = PreferencePairs(table, resolution=16, ties="keep", source=str(shards))
    tie = kept[(2, 0)]
    assert (tie["row"], tie["label_w"], red(tie["pixel_w"])) == (2, 0.5, True)  # jpg_0 first, soft label


def test_index_is_built_once_and_again_when_a_shard_changes(shards, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_preference_table(str(shards), cache_dir=str(cache))
    sidecars = sorted((cache / "xdpo-tar-index").rglob("*.parquet"))
    assert len(sidecars) == 2 and all(s.stat().st_size < 20_000 for s in sidecars)
    assert not [p for p in shards.rglob("*") if p.suffix != ".tar"]  # nothing unpacked next to the shards
    scanned = []
    real = tarshards.scan_tar
    monkeypatch.setattr(tarshards, "scan_tar", lambda tar: scanned.append(tar.name) or real(tar))
    assert len(load_preference_table(str(shards), cache_dir=str(cache))) == 5
    assert scanned == []
    write_shard(shards / "pickapic-00001.tar", [pair_sample("000003", "0.0")])  # rewritten: other size
    assert load_preference_table(str(shards), cache_dir=str(cache))["__key__"] == [
        "000000",
        "000001",
        "000002",
        "000003",
    ]
    assert scanned == ["pickapic-00001.tar"]


def test_bad_rows_name_the_shard_and_the_sample_key(tmp_path):
    folder = tmp_path / "bad"
    no_image = pair_sample("000001", "1.0")
    del no_image["jpg_1"]
    write_shard(folder / "a-00000.tar", [pair_sample("000000", "1.0"), no_image])
    write_shard(
        folder / "a-00001.tar",
        [
            pair_sample("000002", "2"),
            pair_sample("000003", "1.0", jpg_0=b"\x89PNG broken"),
            pair_sample("000004", "0"),
        ],
    )
    shard0, shard1 = (folder / "a-00000.tar").resolve(), (folder / "a-00001.tar").resolve()
    table = load_preference_table(str(folder))
    with pytest.raises(DataError) as err:
        PreferencePairs(table, resolution=8, source=str(folder))
    assert str(err.value).startswith(f"{shard0}: sample 000001, column jpg_1: expected an encoded image")
    report = validate_pairs(table, source=str(folder), on_bad_row="skip", decode_images=True)
    assert report.bad_rows == [1, 2, 3]
    assert str(report.bad[2]).startswith(
        f"{shard1}: sample 000002, column label_0: expected 0, 0.5 or 1, got '2'"
    )
    assert str(report.bad[3]).startswith(f"{shard1}: sample 000003, column jpg_0: expected an encoded image")
    pairs = PreferencePairs(table, resolution=8, source=str(folder), on_bad_row="skip")
    assert pairs.rows.tolist() == [0, 3, 4]
    with pytest.raises(DataError, match=f"{shard1}: sample 000003, column jpg_0: .*cannot decode image"):
        PreferencePairs(table.select([0, 3, 4]), resolution=8, source=str(folder))[(1, 0)]
    assert pairs[(1, 0)]["row"] == 4 and pairs[(1, 0)]["skipped_rows"] == [3]


def test_column_mapping_on_shards_and_labels_absent(tmp_path):
    """A chosen/rejected webdataset (`KEY.txt`, `KEY.chosen.jpg`, `KEY.rejected.png`): columns mapped,
    the first image preferred; the field names are everything after the key's first dot."""
    folder = tmp_path / "cr"
    write_shard(
        folder / "cr-00000.tar",
        [
            {
                "__key__": f"s{i}",
                "txt": f"prompt {i}",
                "chosen.jpg": encoded(RED),
                "rejected.png": encoded(BLUE, fmt="PNG"),
            }
            for i in range(3)
        ],
    )
    columns = {"caption": "txt", "jpg_0": "chosen.jpg", "jpg_1": "rejected.png"}
    table = load_preference_table(str(folder), columns=columns)
    pairs = PreferencePairs(table, resolution=16, source=str(folder), columns=columns)
    assert len(pairs) == 3 and all(red(pairs[(i, 0)]["pixel_w"]) for i in range(3))
    assert pairs[(1, 0)]["caption"] == "prompt 1"


def test_compressed_and_unreadable_shards_are_refused(tmp_path, shards):
    gz = tmp_path / "gz" / "x-00000.tar"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress((shards / "pickapic-00000.tar").read_bytes()))
    with pytest.raises(DataError, match="x-00000.tar: a gzip-compressed tar cannot be read by offset"):
        load_preference_table(str(gz))
    junk = tmp_path / "junk" / "y-00000.tar"
    junk.parent.mkdir()
    junk.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(DataError, match="y-00000.tar: not a readable tar file"):
        load_preference_table(str(junk))


def test_workers_and_pickled_copies_read_the_same_members(shards):
    """Members are read with pread: DataLoader workers forked after the main process read some items,
    and pickled copies (spawned workers), get exactly the main process's items."""
    import pickle

    pairs = PreferencePairs(
        load_preference_table(str(shards)), resolution=16, source=str(shards), flip="pair"
    )
    keys = [(i % 4, 10 + i) for i in range(8)]
    expected = collate_pairs([pairs[k] for k in keys])  # opens the shards in this process
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=8, sampler=keys, collate_fn=collate_pairs, num_workers=2
    )
    batch = next(iter(loader))
    assert torch.equal(batch.pixels, expected.pixels)
    copy = pickle.loads(pickle.dumps(pairs))
    assert torch.equal(copy[keys[3]]["pixel_l"], expected.pixels[8 + 3])
    assert copy.locate(2) == f"{(shards / 'pickapic-00000.tar').resolve()}: sample 000002"
