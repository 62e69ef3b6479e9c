"""Video preference data and Wan end to end: clips decoded from mp4 files and bytes, frame folders and webdataset
shards, sampled to `data.num_frames` at `data.fps`; a 2-frame and a 5-frame clip through the data, the latent
cache (5-D posteriors), training on per-video errors and sampling to mp4."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import BRIGHT, DARK, make_clip, run_training
from xdpo.config import load_config

CLIP = {"data.resolution": 32, "data.num_frames": 5, "data.fps": 8, "family.max_sequence_length": 32}


def brightness_clip(levels, size=24):
    """Frames of uniform grey `levels` (distinct enough to survive H.264)."""
    return [np.full((size, size, 3), v, dtype=np.uint8) for v in levels]


def means(frames):
    return [float(np.asarray(f, dtype=np.float64).mean()) for f in frames]


def test_frames_are_sampled_at_data_fps_and_short_clips_hold(tmp_path):
    from xdpo.data.video import decode_clip, write_video

    levels = [20 * k + 20 for k in range(9)]  # 9 frames at 8 fps: 0, 0.125, ... 1.0 s
    write_video(brightness_clip(levels), tmp_path / "v.mp4", 8)
    got = means(decode_clip(tmp_path / "v.mp4", 3, fps=4))  # t = 0, 0.25, 0.5 s: frames 0, 2, 4
    assert np.allclose(got, [levels[0], levels[2], levels[4]], atol=4), got
    got = means(decode_clip((tmp_path / "v.mp4").read_bytes(), 4, fps=0))  # consecutive, from bytes
    assert np.allclose(got, levels[:4], atol=4), got
    got = means(decode_clip(tmp_path / "v.mp4", 4, fps=2))  # t = 0, 0.5, 1.0, 1.5 s: the last one held
    assert np.allclose(got, [levels[0], levels[4], levels[8], levels[8]], atol=4), got
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, v in enumerate(levels[:2]):
        Image.fromarray(brightness_clip([v])[0]).save(folder / f"{k:03d}.png")
    assert means(decode_clip(folder, 5)) == [levels[0], levels[1], levels[1], levels[1], levels[1]]
    with pytest.raises(ValueError, match="no .*png"):
        decode_clip(tmp_path, 2)  # a folder without frames


def _clip_table(tmp_path):
    """Two pairs: 2-frame clips as a frame folder and as mp4 bytes, 5-frame clips as mp4 paths."""
    from xdpo.data.video import write_video

    short_w, short_l = make_clip(BRIGHT, 2, seed=1), make_clip(DARK, 2, seed=2)
    long_w, long_l = make_clip(BRIGHT, 5, seed=3), make_clip(DARK, 5, seed=4)
    folder = tmp_path / "short_w"
    folder.mkdir()
    for k, f in enumerate(short_w):
        Image.fromarray(f).save(folder / f"{k}.png")
    write_video(short_l, tmp_path / "short_l.mp4", 8)
    write_video(long_w, tmp_path / "long_w.mp4", 8)
    write_video(long_l, tmp_path / "long_l.mp4", 8)
    rows = {
        "caption": ["a short clip", "a long clip"],
        "video_0": ["short_w", "long_w.mp4"],
        "video_1": [(tmp_path / "short_l.mp4").read_bytes(), (tmp_path / "long_l.mp4").read_bytes()],
        "label_0": [1.0, 1.0],
    }
    rows["video_0"] = [str(v) for v in rows["video_0"]]
    table = pa.table({**rows, "video_1": pa.array(rows["video_1"], pa.binary())})
    pq.write_table(table, tmp_path / "clips.parquet")
    return tmp_path / "clips.parquet"


def test_clip_pairs_from_parquet_and_webdataset(tmp_path):
    from xdpo.data import open_data

    path = _clip_table(tmp_path)
    over = [
        "data.columns=jpg_0:video_0,jpg_1:video_1",
        "data.num_frames=5",
        "data.fps=8",
        "data.resolution=32",
    ]
    cfg = load_config(None, [f"data.path={path}", "model.pretrained=m", *over])
    _, data, n = open_data(cfg)
    assert n == 2 and type(data).__name__ == "PreferenceClips"
    batch = data.collate([data[0], data[1]])
    assert batch.pixels.shape == (4, 3, 5, 32, 32) and batch.pixel_size == (32, 32)
    short = batch.pixels[0]
    assert all(torch.equal(short[:, k], short[:, 1]) for k in (2, 3, 4))  # the 2-frame clip holds its last
    assert not torch.equal(short[:, 0], short[:, 1])
    assert float(batch.pixels[0].mean()) > float(batch.pixels[2].mean())  # the winner is brighter

    shard = tmp_path / "shard-000.tar"  # the same clips as webdataset members (KEY.mp4)
    with tarfile.open(shard, "w") as tar:
        for key, cap, a, b in (("k0", "one", "long_w.mp4", "long_l.mp4"),):
            for field, blob in (("caption", cap.encode()), ("jpg_0.mp4", (tmp_path / a).read_bytes()),
                                ("jpg_1.mp4", (tmp_path / b).read_bytes()), ("label_0", b"1")):  # fmt: skip
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    cfg = load_config(
        None,
        [
            f"data.path={shard}",
            "model.pretrained=m",
            "data.columns=jpg_0:jpg_0.mp4,jpg_1:jpg_1.mp4",
            *over[1:],
        ],
    )
    _, tar_data, n = open_data(cfg)
    assert n == 1
    torch.testing.assert_close(tar_data[0]["pixel_w"], data[1]["pixel_w"])


def test_an_undecodable_clip_is_a_bad_row_naming_file_row_and_column(tmp_path):
    from xdpo.data import open_data
    from xdpo.errors import BadRowError

    path = _clip_table(tmp_path)
    table = pq.read_table(path).to_pydict()
    table["video_0"][1] = "missing.mp4"
    pq.write_table(pa.table(table), path)
    over = ["data.columns=jpg_0:video_0,jpg_1:video_1", "data.num_frames=5", "data.resolution=32"]
    _, data, _ = open_data(load_config(None, [f"data.path={path}", "model.pretrained=m", *over]))
    with pytest.raises(BadRowError) as err:
        data[1]
    msg = str(err.value)
    assert "\n" not in msg and "row 1" in msg and "video_0" in msg and "missing.mp4" in msg


def test_two_and_five_frame_clips_round_trip_through_cache_training_and_sampling(
    tmp_path, tiny_wan_pipeline_dir, clip_pairs_parquet
):
    """The clip pairs hold 5-frame and 2-frame mp4 clips: cached as 5-D posteriors (2 latent frames), a cached
    fp32 run equals the uncached one, the trained model samples 5- and 1-frame mp4s that read back."""
    import av

    from xdpo.cli import main
    from xdpo.data.cache_reader import map_shard
    from xdpo.data.video import decode_clip
    from xdpo.evaluate.sample import read_manifest
    from xdpo.train.cache_cli import build_cache

    keys = {**CLIP, "train.max_steps": 2, "data.flip": "pair"}
    cache = tmp_path / "cache"
    cfg = load_config(None, [f"model.pretrained={tiny_wan_pipeline_dir}", f"data.path={clip_pairs_parquet}",
                             f"data.cache={cache}", *[f"{k}={v}" for k, v in keys.items()]])  # fmt: skip
    build_cache(cfg)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["depends"]["data.num_frames"] == 5 and manifest["flips"]
    shard = map_shard(cache / "pairs-00000.safetensors")
    assert shard["mean_w"].shape == (6, 4, 2, 8, 8) and shard["mean_w_flip"].shape == (6, 4, 2, 8, 8)

    plain = run_training(tmp_path / "plain", tiny_wan_pipeline_dir, clip_pairs_parquet, **keys)
    cached = run_training(
        tmp_path / "cached", tiny_wan_pipeline_dir, clip_pairs_parquet, **keys, **{"data.cache": cache}
    )
    a, b = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (plain, cached))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4, abs=1e-5)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bright clip\n")
    for frames in (5, 1):
        out = tmp_path / f"samples{frames}"
        args = [
            "sample",
            "--model",
            str(cached / "final"),
            "--prompts",
            str(prompts),
            "--seeds",
            "0",
            "--steps",
            "2",
        ]
        assert (
            main(
                [
                    *args,
                    "--height",
                    "32",
                    "--width",
                    "32",
                    "--num-frames",
                    str(frames),
                    "--fps",
                    "8",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        [row] = read_manifest(out)
        assert row["num_frames"] == frames and row["video"].endswith(".mp4")
        with av.open(str(out / row["video"])) as container:
            assert sum(1 for _ in container.decode(video=0)) == frames
        clip = decode_clip(out / row["video"], frames)  # the data reader reads the sample back
        assert clip[0].size == (32, 32) and (frames == 1 or len({f.tobytes() for f in clip}) > 1)
        strip = Image.open(out / row["file"])
        assert strip.size == (32 * frames, 32)
