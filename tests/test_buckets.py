"""Aspect-ratio buckets: pairs placed in the bucket nearest their images' shape (both images together),
micro-batches within a bucket as a pure function of (seed, step), SDXL's size conditions per bucket, and a
resumed bucketed run equal to an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_training
from xdpo.data.buckets import auto_buckets, parse_buckets

BUCKETS = [(16, 16), (32, 8), (8, 32)]  # (width, height)
SHAPES = [(40, 36), (64, 16), (16, 64), (70, 20), (30, 30), (18, 60)]  # row r: both images of this shape
EXPECTED = [(16, 16), (32, 8), (8, 32), (32, 8), (16, 16), (8, 32)]


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory):
    """12 learnable pairs (winner brighter) in three aspect ratios; row 7 mixes a 4:1 and a 2:1 image."""
    from xdpo.data import write_pairs_parquet

    rng = np.random.default_rng(0)

    def image(size, offset):
        w, h = size
        arr = rng.uniform(60, 190, (h, w, 3)) + offset
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    shapes = [SHAPES[r % len(SHAPES)] for r in range(12)]
    second = list(shapes)
    second[7] = (48, 24)  # a 4:1 image with a 2:1 one: mean log ratio log(8) / 2 -> the wide bucket
    labels = [1.0 if r % 2 == 0 else 0.0 for r in range(12)]
    imgs0 = [image(s, 50 if lab == 1 else -50) for s, lab in zip(shapes, labels, strict=True)]
    imgs1 = [image(s, -50 if lab == 1 else 50) for s, lab in zip(second, labels, strict=True)]
    path = tmp_path_factory.mktemp("mixed") / "pairs.parquet"
    return write_pairs_parquet(path, [f"picture {r}" for r in range(12)], imgs0, imgs1, labels)


def test_bucket_lists():
    assert parse_buckets(["16x16", "32x8", "8x32", "16x16"], 16, 8) == sorted(set(BUCKETS))
    buckets = auto_buckets(1024, 64)
    assert (1024, 1024) in buckets and (1152, 896) in buckets and (896, 1152) in buckets
    assert all(
        w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and 0.25 <= w / h <= 4 for w, h in buckets
    )
    from xdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="data.buckets"):
        parse_buckets(["1024"], 1024, 64)


def bucketed_pairs(path, **kw):
    from xdpo.data import PreferencePairs, load_preference_table

    return PreferencePairs(load_preference_table(str(path)), resolution=16, buckets=BUCKETS, **kw)


def test_each_pair_goes_to_its_nearest_bucket_with_both_images(mixed_pairs):
    pairs = bucketed_pairs(mixed_pairs, flip="independent", random_crop=True)
    for i in range(len(pairs)):
        item = pairs[(i, 100 + i)]
        w, h = pairs.buckets[int(pairs.bucket_of[i])]
        assert item["pixel_w"].shape == item["pixel_l"].shape == (3, h, w)
        expected = EXPECTED[i % len(SHAPES)]
        assert (w, h) == expected, i


def test_micro_batches_stay_in_a_bucket_and_are_a_function_of_seed_and_step(mixed_pairs):
    from xdpo.train.bucket_batches import BucketBatches

    pairs = bucketed_pairs(mixed_pairs)
    kw = dict(seed=3, max_steps=12, grad_accum=2, world=1, rank=0, batch_size=2)
    whole = list(BucketBatches(pairs.bucket_of, start_step=0, **kw))
    assert whole[10:] == list(BucketBatches(pairs.bucket_of, start_step=5, **kw))  # resume: same batches
    for batch in whole:
        assert len({int(pairs.bucket_of[i]) for i, _ in batch}) == 1
    per_epoch = sum(-(-int((pairs.bucket_of == b).sum()) // 2) for b in np.unique(pairs.bucket_of))
    first_epoch = {i for batch in whole[:per_epoch] for i, _ in batch}
    assert first_epoch == set(range(len(pairs)))  # every pair once per epoch
    other = list(BucketBatches(pairs.bucket_of, start_step=0, **{**kw, "seed": 4}))
    assert other != whole
    two = [
        list(BucketBatches(pairs.bucket_of, start_step=0, **{**kw, "world": 2, "rank": r})) for r in (0, 1)
    ]
    assert [b for pair in zip(*two, strict=True) for b in pair] == list(
        BucketBatches(pairs.bucket_of, start_step=0, **{**kw, "max_steps": 24})
    )  # two processes read the one stream


def test_sdxl_size_conditions_per_bucket(mixed_pairs):
    from xdpo.data import collate_pairs
    from xdpo.models.families.sdxl import image_conditions

    pairs = bucketed_pairs(mixed_pairs, random_crop=True, flip="pair")
    wide = [i for i in range(len(pairs)) if pairs.buckets[int(pairs.bucket_of[i])] == (32, 8)]
    batch = collate_pairs([pairs[(i, 7)] for i in wide[:2]])
    assert batch.pixel_size == (8, 32)
    ids = image_conditions(None, 4, batch.pixel_size, batch.sizes)["time_ids"]
    assert ids[:, 4:].tolist() == [[8.0, 32.0]] * 4  # target size = the bucket's (height, width)
    rows = [pairs.rows[i] for i in wide[:2]]
    heights = [SHAPES[r % len(SHAPES)][1] for r in rows]
    assert ids[:2, 0].tolist() == heights  # original height of each winner
    # cover 32x8: a 64x16 image is resized to 32x8 (no crop), a 70x20 one to 32x9 (one row to crop)
    for k, r in enumerate(rows):
        w, h = SHAPES[r % len(SHAPES)]
        top, left = ids[k, 2].item(), ids[k, 3].item()
        assert 0 <= top <= max(0, int(32 * h / w) - 8) and left == 0


def test_bucketed_sdxl_run_resumes_exactly(tmp_path, tiny_sdxl_pipeline_dir, mixed_pairs):
    from safetensors.torch import load_file

    kw = {"data.resolution": 16, "data.buckets": "16x16,32x8,8x32", "model.lora_rank": 4,
          "train.max_steps": 4, "data.random_crop": "true", "data.flip": "pair"}  # fmt: skip
    fresh = run_training(tmp_path / "fresh", tiny_sdxl_pipeline_dir, mixed_pairs, **kw)
    run_training(tmp_path / "part", tiny_sdxl_pipeline_dir, mixed_pairs,
                 **{**kw, "train.max_steps": 2, "train.checkpoint_every": 2})  # fmt: skip
    part = run_training(
        tmp_path / "part", tiny_sdxl_pipeline_dir, mixed_pairs, **{**kw, "train.resume_from": "latest"}
    )
    name = "pytorch_lora_weights.safetensors"
    a, b = load_file(fresh / "final" / name), load_file(part / "final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_buckets_must_fit_the_family(tmp_path, tiny_sdxl_pipeline_dir, mixed_pairs):
    from xdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="data.buckets"):
        run_training(tmp_path / "bad", tiny_sdxl_pipeline_dir, mixed_pairs,
                     **{"data.resolution": 16, "data.buckets": "16x16,31x8", "model.lora_rank": 4})  # fmt: skip


def test_bucketed_cache_trains_as_the_uncached_run(tmp_path, tiny_sdxl_pipeline_dir, mixed_pairs):
    """The cache keyed per bucket (one latent size per shard): the same losses as reading the images, with
    flips (SDXL's mirrored crop offsets per bucket) and prompt dropout."""
    import json

    from xdpo.config import load_config
    from xdpo.data.cache import read_manifest
    from xdpo.data.cache_reader import open_cache
    from xdpo.models.families import get_family
    from xdpo.train.cache_cli import build_cache

    kw = {"data.resolution": 16, "data.buckets": "16x16,32x8,8x32", "model.lora_rank": 4, "train.max_steps": 4,
          "data.flip": "independent", "data.prompt_dropout": 0.3}  # fmt: skip
    folder = tmp_path / "cache"
    values = {
        "model.pretrained": tiny_sdxl_pipeline_dir,
        "data.path": mixed_pairs,
        "data.cache": folder,
        **kw,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    build_cache(cfg, shard_size=2)
    manifest = read_manifest(folder)
    assert manifest["buckets"] == [[8, 32], [16, 16], [32, 8]] and manifest["pair_shards"] == 6
    store = open_cache(cfg, get_family("sdxl"))
    for i in range(len(store)):
        item = store[(i, i)]
        w, h = store.buckets[int(store.bucket_of[i])]
        assert item["pixel_size"] == (h, w) and item["mean_w"].shape[-2:] == (h // 2, w // 2)
    plain = run_training(tmp_path / "plain", tiny_sdxl_pipeline_dir, mixed_pairs, **kw)
    cached = run_training(
        tmp_path / "cached", tiny_sdxl_pipeline_dir, mixed_pairs, **{**kw, "data.cache": folder}
    )

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(cached) == pytest.approx(losses(plain), rel=1e-4)
