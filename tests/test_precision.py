"""Mixed precision on the CPU (torch autocasts bf16 there too): the reference sees the policy's ids and
sizes unrounded; T5 keeps its fp32 layers (`_keep_in_fp32_modules`) in fp16."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from conftest import run_training
from xdpo.config import load_config
from xdpo.models.tiny import tiny_resolution

SIDE = tiny_resolution(8)  # the tiny pipelines' latents 8 x 8 (the SD one at half its native size)
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

IDS = {"sd": set(), "sdxl": {"time_ids"}, "sd3": set(), "flux": {"guidance"}}
"""Conditions that are not embeddings: sizes and crops (SDXL), the guidance scale (Flux)."""


@pytest.mark.parametrize("family", list(FIXTURE))
def test_reference_sees_the_policys_ids_and_sizes(
    request, tmp_path, make_pairs, monkeypatch, any_precision, family
):
    """A bf16 full fine-tune on images of 683 x 257 px (SDXL's time ids hold both; bf16 would make them 684
    and 256) with Flux guidance 3.7 (bf16: 3.703125): in every step the bf16 reference gets the policy's ids,
    sizes and guidance unchanged, and its embeddings only cast to bf16."""
    module = importlib.import_module(f"xdpo.models.families.{family}")
    real, calls = module.FAMILY.predict, []

    def recording(model, noisy, t, cond):
        calls.append((next(model.parameters()).dtype, {k: v.detach().clone() for k, v in cond.items()}))
        return real(model, noisy, t, cond)

    monkeypatch.setattr(module, "FAMILY", dataclasses.replace(module.FAMILY, predict=recording))
    pairs = make_pairs(tmp_path / "odd.parquet", n=4, size=(683, 257), n_ties=0)
    kw = {**SHORT, "train.max_steps": 1, "train.mixed_precision": "bf16", "model.guidance": 3.7}
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
        from xdpo.train.setup import load_models

        comps = load_models(cfg, CPU)[0]
    t5 = comps.text_encoders["text_encoder_3"]
    assert t5._keep_in_fp32_modules and "wo" in t5._keep_in_fp32_modules
    kept = {n for n, _ in t5.named_parameters() if ".wo." in n}
    assert kept and all(p.dtype == torch.float32 for n, p in t5.named_parameters() if n in kept)
    assert all(p.dtype == torch.float16 for n, p in t5.named_parameters() if n not in kept)
    for name in ("text_encoder", "text_encoder_2"):
        assert all(p.dtype == torch.float16 for p in comps.text_encoders[name].parameters()), name
