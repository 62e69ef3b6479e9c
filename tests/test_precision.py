"""Mixed precision on the CPU (torch autocasts bf16 there too): every family, full and LoRA, with the cache and
without, trains under `train.mixed_precision=bf16` with losses close to the fp32 run's; the reference sees
the policy's ids and sizes unrounded; T5 keeps its fp32 layers (`_keep_in_fp32_modules`) in fp16."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import reset_accelerate_state, run_training
from xdpo.config import load_config
from xdpo.models.small.pipelines import resolution

SIDE = resolution(8)  # the tiny pipelines' latents 8 x 8 (the SD one at half its native size)
CPU = torch.device("cpu")
FIXTURE = {f: f"tiny_{f}_pipeline_dir" for f in ("sdxl", "sd3", "flux")} | {"sd": "tiny_pipeline_dir"}
# 2 steps at a small learning rate: AdamW's first step is sign-like (+-lr per weight), so at a large one the
# bf16 and fp32 runs would part after step 1 for reasons unrelated to precision
SHORT = {
    "data.resolution": SIDE,
    "model.max_sequence_length": 32,
    "train.max_steps": 2,
    "train.learning_rate": 1e-5,
}
LOSS_ATOL = 0.05
"""|loss(bf16) - loss(fp32)| per step at beta 100: logits within 0.1, i.e. the policy-minus-reference error
gaps within 2e-3 (bf16 resolves 2^-8 = 4e-3 near 1). Measured on the 16 runs: at most 0.024 (SDXL, step 2)."""
GRAD_RTOL = 0.1
"""Step 1's gradient norm, bf16 against fp32. Measured: at most 4.6% apart (SDXL, LoRA)."""


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory, pairs_parquet, tiny_pipeline_dir, tiny_sdxl_pipeline_dir, tiny_sd3_pipeline_dir,
    tiny_flux_pipeline_dir,
):  # fmt: skip
    """`runs(family, lora, precision, cached)`: the metrics of a 2-step run, each made once per module; the
    cached runs read a cache built in bf16 (latents and conditions in bf16)."""
    made: dict = {}
    root = tmp_path_factory.mktemp("precision")
    pipes = {"sd": tiny_pipeline_dir, "sdxl": tiny_sdxl_pipeline_dir, "sd3": tiny_sd3_pipeline_dir}
    pipes["flux"] = tiny_flux_pipeline_dir

    def get(family: str, lora: int, precision: str, cached: bool = False) -> list[dict]:
        key = (family, lora, precision, cached)
        if key in made:
            return made[key]
        pipe = pipes[family]
        kw = {**SHORT, "model.lora_rank": lora, "train.mixed_precision": f"'{precision}'"}
        if cached:
            from xdpo.train.cache_cli import build_cache

            folder = root / f"cache-{family}"
            if not folder.is_dir():
                reset_accelerate_state()
                values = {"model.pretrained": pipe, "data.path": pairs_parquet, "data.cache": folder, **kw}
                build_cache(load_config(None, [f"{k}={v}" for k, v in values.items()]), shard_size=8)
            kw["data.cache"] = folder
        reset_accelerate_state()  # accelerate fixes the precision with the process's first Accelerator
        made[key] = metrics(run_training(root / "-".join(map(str, key)), pipe, pairs_parquet, **kw))
        return made[key]

    yield get
    reset_accelerate_state()


@pytest.mark.parametrize("cached", [False, True], ids=["images", "cache"])
@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("family", list(FIXTURE))
def test_bf16_trains_every_family_close_to_fp32(runs, any_precision, family, lora, cached):
    fp32, bf16 = runs(family, lora, "no"), runs(family, lora, "bf16", cached)
    assert [r["step"] for r in bf16] == [1, 2] and all(math.isfinite(r["loss"]) for r in bf16)
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a["loss"], b["loss"])
    assert bf16[0]["grad_norm"] == pytest.approx(fp32[0]["grad_norm"], rel=GRAD_RTOL)


IDS = {"sd": set(), "sdxl": {"time_ids"}, "sd3": set(), "flux": {"guidance"}}
"""Conditions that are not embeddings: sizes and crops (SDXL), the guidance scale (Flux)."""


@pytest.mark.parametrize("family", list(FIXTURE))
def test_reference_sees_the_policys_ids_and_sizes(
    request, tmp_path, make_pairs, monkeypatch, any_precision, family
):
    """A bf16 full fine-tune on images of 683 x 257 px (SDXL's time ids hold both; bf16 would make them 684
    and 256) with Flux guidance 3.7 (bf16: 3.703125): in every step the bf16 reference gets the policy's ids,
    sizes and guidance unchanged, and its embeddings only cast to bf16."""
    from xdpo.models.families import _built_in

    fam = _built_in()[family]
    real, calls = fam.predict, []

    def recording(model, noisy, t, cond):
        calls.append((next(model.parameters()).dtype, {k: v.detach().clone() for k, v in cond.items()}))
        return real(model, noisy, t, cond)

    monkeypatch.setitem(_built_in(), family, dataclasses.replace(fam, predict=recording))
    pairs = make_pairs(tmp_path / "odd.parquet", n=4, size=(683, 257), n_ties=0)
    kw = {**SHORT, "train.max_steps": 1, "train.mixed_precision": "bf16", "family.guidance": 3.7}
    run_training(tmp_path / "run", request.getfixturevalue(FIXTURE[family]), pairs, **kw)
    assert [dtype for dtype, _ in calls] == [torch.bfloat16, torch.float32]  # the reference, then the policy
    (_, ref), (_, policy) = calls
    assert ref.keys() == policy.keys() and IDS[family] <= set(policy)
    for key, value in policy.items():
        if key in IDS[family]:
            assert ref[key].dtype == value.dtype and torch.equal(ref[key], value), (key, ref[key], value)
        else:
            assert ref[key].dtype == torch.bfloat16 and torch.equal(ref[key], value.bfloat16()), key
    if family == "sdxl":
        assert {257.0, 683.0} <= set(policy["time_ids"].flatten().tolist())


@pytest.mark.parametrize("cache", [False, True], ids=["train", "cache"])
def test_t5_keeps_its_fp32_layers_in_fp16(tiny_sd3_pipeline_dir, cache):
    """In fp16 the text encoders load as `from_pretrained(torch_dtype=float16)` loads them: T5's feed-forward
    output layers (`wo`, its `_keep_in_fp32_modules`) stay in fp32, the rest (and both CLIPs) in fp16; for
    training and for `xdpo cache` alike."""
    cfg = load_config(
        None, [f"model.pretrained={tiny_sd3_pipeline_dir}", "data.path=x", "train.mixed_precision=fp16"]
    )
    if cache:
        from xdpo.models.families import get_family
        from xdpo.train.cache_cli import load_encoders

        comps = load_encoders(cfg, get_family("sd3"), CPU)
    else:
        from xdpo.objectives import get_objective
        from xdpo.train.setup import load_models

        comps = load_models(cfg, CPU, get_objective(cfg.loss.objective)).comps
    t5 = comps.text_encoders["text_encoder_3"]
    assert t5._keep_in_fp32_modules and "wo" in t5._keep_in_fp32_modules
    kept = {n for n, _ in t5.named_parameters() if ".wo." in n}
    assert kept and all(p.dtype == torch.float32 for n, p in t5.named_parameters() if n in kept)
    assert all(p.dtype == torch.float16 for n, p in t5.named_parameters() if n not in kept)
    for name in ("text_encoder", "text_encoder_2"):
        assert all(p.dtype == torch.float16 for p in comps.text_encoders[name].parameters()), name
