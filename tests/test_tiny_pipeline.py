"""The tiny random pipelines (`xdpo.models.small`): the SD one saved, loaded offline, generates; the builder's table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xdpo.errors import ConfigError
from xdpo.models.small import ASSEMBLERS, build_pipeline, resolution

SD = "StableDiffusionPipeline"


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


def test_saved_layout_and_size(tiny_pipeline_dir):
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    size = sum(f.stat().st_size for f in tiny_pipeline_dir.rglob("*") if f.is_file())
    assert size < 20e6


def test_loads_offline_and_generates(pipe):
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert resolution(16) == 32
    out = pipe(
        ["a bright picture", "a dark picture"],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    )
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]
    arr = np.asarray(out.images[0])
    assert arr.shape == (32, 32, 3) and arr.std() > 0  # random weights: noisy, but not blank


def test_components_match_sd15(pipe):
    tok, te = pipe.tokenizer, pipe.text_encoder
    assert tok.model_max_length == 77 and len(tok) == 49408
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids
    assert (te.config.bos_token_id, te.config.eos_token_id) == (49406, 49407)
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == 77
    assert te.config.hidden_size == pipe.unet.config.cross_attention_dim == 32
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    cfg = pipe.scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == (
        1000,
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert cfg.prediction_type == "epsilon" and cfg.clip_sample is False and cfg.steps_offset == 1
    assert pipe.safety_checker is None


def test_v_prediction_propagated(tiny_pipeline_v_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_v_dir)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)  # a scheduler swap keeps SD 1.5's settings
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.set_alpha_to_one is False


def test_seed_determines_weights(tmp_path, clip_tokenizer_dir):
    from safetensors.torch import load_file

    kw = {"seed": 1, "sample_size": 8, "latent_channels": 3, "tokenizer_dir": clip_tokenizer_dir}
    a = build_pipeline(SD, tmp_path / "a", **kw)
    b = build_pipeline(SD, tmp_path / "b", **kw)
    c = build_pipeline(SD, tmp_path / "c", **{**kw, "seed": 2})
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    wc = load_file(c / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    config = json.loads((a / "unet" / "config.json").read_text())
    assert config["sample_size"] == 8 and config["in_channels"] == 3


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="prediction_type"):
        build_pipeline(SD, tmp_path, prediction_type="flow")
    with pytest.raises(ConfigError, match="sample_size"):
        build_pipeline(SD, tmp_path, sample_size=7)
    with pytest.raises(ConfigError, match="tiny StableDiffusionPipeline: unknown option 'with_t5'"):
        build_pipeline(SD, tmp_path, with_t5=False)
    with pytest.raises(ConfigError, match="no tiny pipeline for 'KandinskyPipeline'"):
        build_pipeline("KandinskyPipeline", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_every_built_in_family_has_a_tiny_pipeline():
    """The builder's table is keyed by the families' pipeline classes: one assembler each."""
    from xdpo.models.families import families

    assert sorted(ASSEMBLERS) == sorted(fam.pipeline_class for fam in families().values())
