"""A full fine-tune's reference copy placed for large denoisers (`reference.place`): streamed block by block from
CPU memory (the same predictions, the blocks' weights back in CPU memory between forwards), sharded over two
FSDP2 processes (each holds half), refused where it cannot work; the memory estimate follows the placement."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import torchrun
from xdpo.config import load_config
from xdpo.errors import ConfigError

CPU = torch.device("cpu")


def cfg_of(pipe, data, *extra):
    return load_config(None, [f"model.pretrained={pipe}", f"data.path={data}", "data.resolution=16", *extra])


def test_a_reference_streamed_from_cpu_predicts_as_a_whole_copy(tiny_qwenimage_pipeline_dir, pairs_parquet):
    from xdpo.train.reference.placement import blocks_of
    from xdpo.train.setup import single_process

    base = ["family.max_sequence_length=32"]
    _, whole = single_process(cfg_of(tiny_qwenimage_pipeline_dir, pairs_parquet, *base), CPU)
    _, streamed = single_process(
        cfg_of(tiny_qwenimage_pipeline_dir, pairs_parquet, *base, "reference.place=cpu"), CPU
    )
    ref = streamed.reference.storage.ref_model
    blocks = blocks_of(ref)
    hosts = [p.data_ptr() for b in blocks for p in b.parameters()]
    comps = whole.comps
    cond = comps.family.encode_text(comps, ["a cat", "a bright picture"], CPU)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100.0, 900.0])
    with torch.inference_mode():
        a, b = whole.reference.predict(x, t, cond), streamed.reference.predict(x, t, cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [p.data_ptr() for b in blocks for p in b.parameters()] == hosts  # back in CPU memory after it
    with pytest.raises(ConfigError, match="reference.place: .* names no blocks"):
        blocks_of(torch.nn.Linear(2, 2))


def test_a_sharded_reference_must_be_frozen_and_needs_several_processes(
    tiny_qwenimage_pipeline_dir, pairs_parquet
):
    with pytest.raises(ConfigError, match="`reference.place`: sharded holds a frozen reference only"):
        cfg_of(
            tiny_qwenimage_pipeline_dir, pairs_parquet, "reference.place=sharded", "reference.strategy=ema"
        )
    from xdpo.errors import XdpoError
    from xdpo.train.reference.placement import shard_across_processes

    with pytest.raises(XdpoError, match="needs several processes under FSDP2 or DeepSpeed ZeRO-3"):
        shard_across_processes(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.float32)


def test_the_memory_estimate_follows_the_placement(tiny_pipeline_dir, pairs_parquet):
    """On the tiny SD UNet (several blocks): whole, divided when sharded, one block on the device when streamed."""
    from xdpo.models.load import check_pipeline
    from xdpo.train.memory import estimate, format_estimate, meta_modules

    def est(*extra, sharding=("none", 1)):
        cfg = cfg_of(tiny_pipeline_dir, pairs_parquet, "train.mixed_precision=bf16", *extra)
        fam = check_pipeline(cfg.model.pretrained)
        return estimate(meta_modules(cfg.model.pretrained, fam, cfg), fam.denoiser, cfg, sharding)

    whole, fsdp = est(), est(sharding=("fsdp", 4))
    assert whole["reference"] == 2 * whole["_params"] == fsdp["reference"]  # bf16, a full copy per process
    assert est("reference.place=sharded", sharding=("fsdp", 4))["reference"] == whole["reference"] / 4
    streamed = est("reference.place=cpu")
    assert 0 < streamed["reference"] < whole["reference"] and streamed["_host"] > 0
    assert streamed["reference"] + streamed["_host"] > whole["reference"]  # one block counted on both sides
    assert "(reference in CPU memory)" in format_estimate(streamed)
    assert est("model.lora_rank=4", "reference.place=cpu")["reference"] == 0  # LoRA: adapters off, no copy


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "zero3"])
def test_two_processes_shard_the_reference(tmp_path, tiny_pipeline_dir, pairs_parquet, mode):
    """Full fine-tune under FSDP2 or ZeRO-3 on 2 CPU processes: the frozen reference is sharded as the policy
    (each process holds half: FSDP2 per block, a ZeRO-3 inference engine) and the run trains to a final/."""
    if mode == "fsdp":
        from test_fsdp import FSDP_ENV as env
    else:
        pytest.importorskip("deepspeed")
        from test_deepspeed import ds_env

        env = ds_env(3)
    out = tmp_path / "run"
    args = [
        f"model.pretrained={tiny_pipeline_dir}", f"data.path={pairs_parquet}", "data.resolution=32", f"output_dir={out}",
        "train.batch_size=2", "train.max_steps=2", "train.scale_lr=false", "train.warmup_steps=0", "loss.beta=100",
        "reference.place=sharded",
    ]  # fmt: skip
    log = torchrun("train", *args, env=env)
    for rank in (0, 1):
        line = next(x for x in log.splitlines() if f"reference: process {rank} holds" in x)
        assert "(0.50)" in line, line
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and (out / "final" / "model_index.json").is_file()
