"""The latent and text-condition cache (`xdpo cache`, `data.cache`): cached training, agreement with
uncached runs, refusals, resume after a kill, flips, and two processes sharing the encoding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun
from xdpo.cli import main
from xdpo.config import load_config
from xdpo.data.cache import open_pairs, pair_shard, read_manifest
from xdpo.data.cache_reader import open_cache
from xdpo.train.cache_cli import build_cache
from xdpo.train.recipe import train

TRAIN = {
    "data.resolution": 32,
    "train.max_steps": 3,
    "train.batch_size": 2,
    "train.learning_rate": 1e-3,
    "train.scale_lr": False,
    "train.warmup_steps": 0,
    "train.checkpoint_every": 0,
    "loss.beta": 100.0,
}
AUGMENT = {"data.flip": "pair", "data.prompt_dropout": 0.3}
LOSS_RTOL = 1e-4
"""Cached vs uncached losses (fp32): the VAE sees other batch compositions, so latents differ by ~1e-7."""


def overrides(pipe, pairs, **kw) -> list[str]:
    values = {"model.pretrained": pipe, "data.path": pairs, **TRAIN, **kw}
    return [f"{k}={v}" for k, v in values.items()]


def make_cache(folder, pipe, pairs, shard_size=4, **kw):
    return build_cache(
        load_config(None, overrides(pipe, pairs, **{"data.cache": folder}, **kw)), shard_size=shard_size
    )


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def shard_tensors(folder) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def aug_cache(tmp_path_factory, tiny_pipeline_dir, pairs_parquet):
    """Built with flips (both orientations) and prompt dropout (the empty caption): 3 + 3 shards."""
    return make_cache(tmp_path_factory.mktemp("cache") / "aug", tiny_pipeline_dir, pairs_parquet, **AUGMENT)


def test_cached_run_trains_without_the_encoders_and_final_loads(
    tmp_path, tiny_pipeline_dir, pairs_parquet, aug_cache, monkeypatch, capsys
):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    def never(*args, **kw):
        raise AssertionError("a cached run called the VAE encoder or a text encoder")

    monkeypatch.setattr(AutoencoderKL, "encode", never)
    monkeypatch.setattr(CLIPTextModel, "forward", never)
    probe = {"reference.strategy": "periodic", "reference.update_every": 1, "reference.probe_size": 4}
    cfg = load_config(
        None,
        overrides(
            tiny_pipeline_dir,
            pairs_parquet,
            output_dir=tmp_path / "run",
            **{"data.cache": aug_cache},
            **AUGMENT,
            **probe,
        ),
    )
    out = train(cfg)
    monkeypatch.undo()
    assert "from the cache" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    before = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pipe = StableDiffusionPipeline.from_pretrained(out / "final", safety_checker=None)
    image = pipe("a bright picture", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0


@pytest.mark.parametrize("sample", [False, True], ids=["posterior-mean", "posterior-sample"])
def test_cached_run_matches_uncached_run(tmp_path, tiny_pipeline_dir, pairs_parquet, aug_cache, sample):
    """With flips and prompt dropout: the same batches, captions, latents (posterior mean, or the same
    posterior sample from the step's generator) and hence the same losses, within LOSS_RTOL."""
    from xdpo.data import collate_pairs
    from xdpo.data.cache_reader import collate_cached
    from xdpo.data.encode import encode
    from xdpo.models.families import get_family
    from xdpo.models.load import load_components
    from xdpo.train.batches import batch_keys

    kw = {**AUGMENT, "data.sample_posterior": sample}
    plain = train(
        load_config(None, overrides(tiny_pipeline_dir, pairs_parquet, output_dir=tmp_path / "a", **kw))
    )
    cached_cfg = load_config(
        None,
        overrides(
            tiny_pipeline_dir, pairs_parquet, output_dir=tmp_path / "b", **{"data.cache": aug_cache}, **kw
        ),
    )
    cached = train(cached_cfg)
    assert losses(cached) == pytest.approx(losses(plain), rel=LOSS_RTOL)

    # batch by batch: captions (dropout), flips and latents replayed from the cache
    comps = load_components(cached_cfg.model, cached_cfg.family)
    _, pairs, n = open_pairs(cached_cfg)
    store = open_cache(cached_cfg, get_family("sd"))
    for step in range(4):
        keys = batch_keys(n, seed=0, step=step, micro=0, grad_accum=1, rank=0, world=1, batch_size=2)
        a, b = collate_pairs([pairs[k] for k in keys]), collate_cached([store[k] for k in keys])
        assert a.captions == b.captions and torch.equal(a.label, b.label)
        ea, eb = (encode(comps, x, torch.Generator().manual_seed(step), sample) for x in (a, b))
        (za, ca), (zb, cb) = (ea.latents, ea.cond), (eb.latents, eb.cond)
        torch.testing.assert_close(za, zb, rtol=0, atol=1e-5)
        torch.testing.assert_close(ca, cb, rtol=0, atol=1e-6)
    assert any(c == "" for k in range(n) for c in [store[(k, k)]["caption"]])  # dropout happened


def test_flips_are_cached_in_both_orientations(tmp_path, tiny_pipeline_dir, pairs_parquet, aug_cache):
    """Documented choice: flipped images are encoded (a flipped latent is not the latent of the flipped
    image); a cache without them, or without the empty caption, is refused by runs that need them."""
    from xdpo.data import collate_pairs
    from xdpo.models.load import latent_params, load_components

    cfg = load_config(None, overrides(tiny_pipeline_dir, pairs_parquet))
    shard = load_file(pair_shard(aug_cache, 0))
    assert {"mean_w_flip", "logvar_w_flip", "mean_l_flip", "logvar_l_flip"} <= set(shard)
    _, pairs, _ = open_pairs(cfg)
    batch = collate_pairs([pairs[(i, i)] for i in range(4)])
    vae = load_components(cfg.model, cfg.family).vae
    with torch.no_grad():
        mean_flipped, _ = latent_params(vae, batch.pixels[:4].flip(-1))
    torch.testing.assert_close(shard["mean_w_flip"], mean_flipped, rtol=0, atol=1e-5)
    assert (shard["mean_w"].flip(-1) - mean_flipped).norm() > 0.05 * mean_flipped.norm()

    plain = make_cache(tmp_path / "plain", tiny_pipeline_dir, pairs_parquet)
    assert "mean_w_flip" not in load_file(pair_shard(plain, 0))
    for key, value, message in [
        (
            "data.flip",
            "independent",
            "was built for data.flip=none (one orientation cached), the config says independent",
        ),
        (
            "data.prompt_dropout",
            0.2,
            "was built for data.prompt_dropout=0 (no empty-caption conditions cached)",
        ),
    ]:
        args = overrides(
            tiny_pipeline_dir, pairs_parquet, output_dir=tmp_path / "run", **{"data.cache": plain, key: value}
        )
        with pytest.raises(
            Exception, match=f"data.cache: {plain} {message}".replace("(", r"\(").replace(")", r"\)")
        ):
            train(load_config(None, args))


def test_batched_reads_equal_the_shards(tmp_path, aug_cache):
    """The DataLoader's `__getitems__` (one indexing per shard and tensor) gives each item as `__getitem__`
    does, with the rows, flips, captions and dropout of the shards as safetensors reads them; `map_shard`
    reads every dtype a cache holds as safetensors does, and a damaged shard is refused with one line."""
    from safetensors.torch import save_file

    from xdpo.data.cache import FLIP, text_shard
    from xdpo.data.cache_reader import CachedPairs, item_choices, map_shard

    manifest = read_manifest(aug_cache)
    store = CachedPairs(aug_cache, manifest, prompt_dropout=0.3, flip="independent")
    shards = shard_tensors(aug_cache)
    size = manifest["shard_size"]
    keys = [(i, 1000 + 7 * i) for i in range(len(store))][::-1] + [(0, 5)]  # across shards, repeated
    batch = store.__getitems__(keys)
    for (index, seed), item in zip(keys, batch, strict=True):
        single = store[(index, seed)]
        assert list(item) == list(single)
        for k, v in item.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == single[k].dtype and torch.equal(v, single[k]), k
            elif k == "cond":
                assert all(torch.equal(v[c], single[k][c]) for c in v)
            else:
                assert v == single[k], k
        drop, flip_w, flip_l = item_choices(seed, 0.3, "independent")
        pairs = shards[pair_shard(aug_cache, index // size).name]
        off = index % size
        assert torch.equal(item["mean_w"], pairs["mean_w" + (FLIP if flip_w else "")][off])
        assert torch.equal(item["logvar_l"], pairs["logvar_l" + (FLIP if flip_l else "")][off])
        assert item["label_w"] == float(pairs["label_w"][off]) and item["row"] == int(pairs["row"][off])
        c = store.captions.index("") if drop else int(store.caption_index[index])
        assert item["caption"] == store.captions[c]
        text = shards[text_shard(aug_cache, c // size).name]
        assert all(torch.equal(item["cond"][k], text[k][c % size]) for k in text)

    mixed = {
        "f32": torch.randn(3, 2),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(6).view(3, 2),
        "flag": torch.tensor([True, False, True]),
        "u8": torch.arange(7, dtype=torch.uint8),
    }
    save_file(mixed, tmp_path / "mixed.safetensors", metadata={"captions": "[]"})
    mapped = map_shard(tmp_path / "mixed.safetensors")
    assert all(mapped[k].dtype == v.dtype and torch.equal(mapped[k], v) for k, v in mixed.items())
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "mixed.safetensors").read_bytes()[:40])
    with pytest.raises(Exception, match=r"data.cache: cannot read shard .*cut.safetensors"):
        map_shard(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.resolution=24", "was built for data.resolution=32, the config says 24"),
        ("data.ties=keep", "was built for data.ties=drop, the config says keep"),
        ("data.max_pairs=5", "was built for data.max_pairs=0, the config says 5"),
        ("model.pretrained=V", "was built for model.pretrained="),
        ("data.random_crop=true", "data.random_crop`: cannot be used with data.cache"),
    ],
)
def test_mismatched_cache_is_refused_with_one_line(
    tmp_path, capsys, tiny_pipeline_dir, tiny_pipeline_v_dir, pairs_parquet, aug_cache, override, message
):
    override = override.replace("=V", f"={tiny_pipeline_v_dir}")
    out = tmp_path / "run"
    args = overrides(tiny_pipeline_dir, pairs_parquet, output_dir=out, **{"data.cache": aug_cache})
    assert main(["train", *args, override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_changed_data_and_missing_cache_are_refused(tmp_path, capsys, make_pairs, tiny_pipeline_dir):
    data = make_pairs(tmp_path / "pairs.parquet", n=8)
    cache = make_cache(tmp_path / "cache", tiny_pipeline_dir, data)
    make_pairs(data, n=10)  # the same file, other rows
    args = overrides(tiny_pipeline_dir, data, output_dir=tmp_path / "run")
    assert main(["train", *args, f"data.cache={cache}"]) == 2
    assert (
        f"data.cache: {cache} was built for 8 rows of data.path={data}, which now gives 10"
        in capsys.readouterr().err
    )
    assert main(["train", *args, f"data.cache={tmp_path / 'nothing'}"]) == 2
    assert "holds no cache" in capsys.readouterr().err
    assert main(["cache", *overrides(tiny_pipeline_dir, data)]) == 2
    assert "data.cache: required by `xdpo cache`" in capsys.readouterr().err


def test_killed_cache_run_resumes(tmp_path, tiny_pipeline_dir, pairs_parquet, aug_cache, monkeypatch, capsys):
    """Killed while writing the third shard: the next run keeps the two complete shards, removes the
    half-written one and ends with the same cache as an uninterrupted run."""
    import xdpo.train.cache_cli as cli

    real, calls = cli.save_shard, []

    def killed_on_third(path, *args, **kw):
        calls.append(path.name)
        if len(calls) == 3:
            path.with_name(path.name + ".tmp0").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(path, *args, **kw)

    folder = tmp_path / "cache"
    monkeypatch.setattr(cli, "save_shard", killed_on_third)
    args = overrides(tiny_pipeline_dir, pairs_parquet, **{"data.cache": folder}, **AUGMENT)
    assert main(["cache", "--shard-size", "4", *args]) == 130
    assert read_manifest(folder)["complete"] is False
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("pairs-*.safetensors")}
    assert sorted(done) == ["pairs-00000.safetensors", "pairs-00001.safetensors"]
    capsys.readouterr()
    assert main(["train", *args, f"output_dir={tmp_path / 'run'}"]) == 2
    assert "is incomplete" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(
        cli, "save_shard", lambda path, *a, **kw: (calls.append(path.name), real(path, *a, **kw))
    )
    assert main(["cache", "--shard-size", "4", *args]) == 0
    assert calls == [
        "pairs-00002.safetensors",
        "text-00000.safetensors",
        "text-00001.safetensors",
        "text-00002.safetensors",
    ]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("pairs-0000[01].safetensors")} == done
    assert not list(folder.glob("*.tmp*")) and read_manifest(folder)["complete"] is True
    fresh, resumed = shard_tensors(aug_cache), shard_tensors(folder)
    assert fresh.keys() == resumed.keys()
    for name in fresh:
        assert fresh[name].keys() == resumed[name].keys()
        for k in fresh[name]:
            assert torch.equal(fresh[name][k], resumed[name][k]), (name, k)
    assert main(["cache", "--shard-size", "4", *args]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_other_families_cache_their_conditions(
    request, tmp_path, pairs_parquet, tiny_sdxl_pipeline_dir, tiny_flux_pipeline_dir, family
):
    """SDXL (time ids from the cached pixel size) and Flux (guidance, pooled CLIP + T5): cached batches
    equal uncached ones; the cache is built without loading the denoiser's weights."""
    from xdpo.data import collate_pairs
    from xdpo.data.cache_reader import collate_cached
    from xdpo.data.encode import encode
    from xdpo.models.load import load_components

    pipe = tiny_sdxl_pipeline_dir if family == "sdxl" else tiny_flux_pipeline_dir
    kw = {"data.resolution": 16, **AUGMENT}
    cache = make_cache(tmp_path / "cache", pipe, pairs_parquet, **kw)
    cfg = load_config(None, overrides(pipe, pairs_parquet, **{"data.cache": cache}, **kw))
    comps = load_components(cfg.model, cfg.family)
    store = open_cache(cfg, comps.family)
    _, pairs, _ = open_pairs(cfg)
    keys = [(0, 11), (5, 12), (7, 13)]
    a, b = collate_pairs([pairs[k] for k in keys]), collate_cached([store[k] for k in keys])
    ea, eb = (encode(comps, x, torch.Generator().manual_seed(0)) for x in (a, b))
    (za, ca), (zb, cb) = (ea.latents, ea.cond), (eb.latents, eb.cond)
    torch.testing.assert_close(za, zb, rtol=0, atol=1e-5)
    assert ca.keys() == cb.keys() and ({"time_ids"} if family == "sdxl" else {"guidance"}) <= set(cb)
    torch.testing.assert_close(ca, cb, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_processes_share_the_encoding(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """torchrun, 2 processes on the CPU: each encodes its shards; the result equals a one-process cache."""
    folder = tmp_path / "ddp"
    args = overrides(tiny_pipeline_dir, pairs_parquet, **{"data.cache": folder}, **AUGMENT)
    log = torchrun("cache", "--shard-size", "3", *args)
    for rank in (0, 1):  # 11 pairs in 4 shards, 11 captions + "" in 4 shards: 2 + 2 each
        assert f"process {rank}/2 encoded 2 image shard(s)" in log
        assert "and 2 caption shard(s)" in log
    assert read_manifest(folder)["complete"] is True
    single = make_cache(tmp_path / "one", tiny_pipeline_dir, pairs_parquet, shard_size=3, **AUGMENT)
    a, b = shard_tensors(single), shard_tensors(folder)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=1e-6)
