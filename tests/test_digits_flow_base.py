"""The shipped flow-matching digits base (digits-flow): a StableDiffusion3Pipeline folder that loads offline,
conditions as the pipeline's encode_prompt does, follows the prompted digit; build-base --family flow --quick."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from xdpo.apps.digits import FLOW_BASE_DIR_NAME, base_model_path, flow_base_model_path
from xdpo.apps.digits.flow_base import (
    T5_TOKENS,
    collapsed_matches_full,
    load_flow_pipeline,
    measure_flow_accuracy,
)
from xdpo.cli import main

ACCURACY_FLOOR = 0.9  # measured on 200 samples at the default settings: see xdpo_digits.json in the folder


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(
        flow_base_model_path(), text_encoder_3=None, tokenizer_3=None
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_flow_base_folder():
    path = flow_base_model_path()
    assert path.name == FLOW_BASE_DIR_NAME
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 14
    summary = json.loads((path / "xdpo_digits.json").read_text())
    assert not summary["quick"]
    assert summary["prompted_digit_accuracy"]["value"] >= 0.95
    assert {"steps", "guidance"} <= set(summary["sampling"])
    # the same autoencoder weights as digits-base, with SD3's latent shift set explicitly
    base_vae = (base_model_path() / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (path / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == base_vae
    vae_cfg = json.loads((path / "vae" / "config.json").read_text())
    assert isinstance(vae_cfg["shift_factor"], float) and vae_cfg["scaling_factor"] > 0


def test_loads_offline_and_generates(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    out = pipe(
        ["the number 4", "a handwritten digit one"],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    images = out.images
    assert [im.size for im in images] == [(32, 32)] * 2 and images[0].mode == "RGB"
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_conditioning_matches_training(pipe):
    """encode_prompt without T5: 77 CLIP tokens + T5_TOKENS zero tokens, pooled = both projections;
    training encoded one zero token with attention logit + log(T5_TOKENS): the same function."""
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        "the number 4", None, None, max_sequence_length=T5_TOKENS
    )
    jd = pipe.transformer.config.joint_attention_dim
    assert emb.shape == (1, 77 + T5_TOKENS, jd) and pooled.shape == (
        1,
        pipe.transformer.config.pooled_projection_dim,
    )
    assert torch.all(emb[:, 77:] == 0) and emb[:, :77].abs().sum() > 0
    assert neg.shape == emb.shape and not torch.equal(neg_pooled, pooled)  # the empty caption differs
    assert collapsed_matches_full(pipe.transformer) < 1e-4
    # the count of zero tokens matters (so the collapse's log-multiplicity is not a no-op)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    with torch.no_grad():
        full = pipe.transformer(x, emb, pooled, t).sample
        one = pipe.transformer(x, emb[:, : 77 + 1], pooled, t).sample
    assert (full - one).abs().max() > 1e-3


@pytest.mark.slow
def test_prompted_digit_accuracy():
    acc = measure_flow_accuracy(flow_base_model_path(), n_per_digit=5, seed=0)
    assert acc["n"] == 50
    assert acc["accuracy"] >= ACCURACY_FLOOR, (
        f"prompted-digit accuracy {acc['accuracy']:.2f} < {ACCURACY_FLOOR}"
    )
    assert np.std([np.asarray(im, dtype=float).mean() for im in acc["images"]]) > 0


def test_build_flow_base_quick(tmp_path):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "flow"
    assert (
        main(["digits", "build-base", "--family", "flow", "--out", str(out), "--quick", "--seed", "1"]) == 0
    )
    summary = json.loads((out / "xdpo_digits.json").read_text())
    assert summary["quick"] and summary["recipe"]["steps"] == 3 and "prompted_digit_accuracy" in summary
    p = load_flow_pipeline(out)
    assert isinstance(p.transformer, SD3Transformer2DModel)
    img = p(["the number 4"], num_inference_steps=2, guidance_scale=3.0).images[0]
    assert img.size == (32, 32)


def test_flow_training_is_deterministic(pipe):
    """A fixed seed gives the same weights twice (noise from FlowProcess, EMA from diffusers' EMAModel)."""
    from xdpo.apps.digits.base import make_vae
    from xdpo.apps.digits.flow_base import FlowRecipe, train_flow

    g = torch.Generator().manual_seed(0)
    lat_mean, lat_std = torch.randn(20, 4, 8, 8, generator=g), torch.full((20, 4, 8, 8), 0.01)
    labels = np.arange(20) % 10
    recipe, toks = FlowRecipe(steps=2, batch=4), (pipe.tokenizer, pipe.tokenizer_2)

    def weights(seed: int) -> dict:
        torch.manual_seed(0)
        vae = make_vae()
        models = train_flow(
            lat_mean, lat_std, labels, vae, toks, recipe, torch.Generator().manual_seed(seed), None
        )
        return {f"{i}.{k}": v for i, m in enumerate(models) for k, v in m.state_dict().items()}

    a, b, c = weights(1), weights(1), weights(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_base_help_lists_family(capsys):
    with pytest.raises(SystemExit) as e:
        main(["digits", "build-base", "--help"])
    assert e.value.code == 0
    assert "--family" in capsys.readouterr().out
