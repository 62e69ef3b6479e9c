"""xdpo.models.padding: an SD3 transformer without T5 attends to its zero padding once, the same function."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from xdpo.apps.digits import flow_base_model_path
from xdpo.models.padding import (
    HOOKED,
    CollapsedJointAttnProcessor,
    collapse_zero_padding,
    trailing_zero_tokens,
)


@pytest.fixture(scope="module")
def transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(flow_base_model_path() / "transformer").eval()


def _inputs(c, zeros: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, generator=g)
    clip = torch.randn(3, 77, c.joint_attention_dim, generator=g)
    context = torch.cat([clip, torch.zeros(3, zeros, c.joint_attention_dim)], 1)
    pooled = torch.randn(3, c.pooled_projection_dim, generator=g)
    return {"hidden_states": x, "encoder_hidden_states": context, "pooled_projections": pooled}


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, timestep=torch.tensor([100.0, 500.0, 900.0]), return_dict=False)[0]


def test_trailing_zero_tokens():
    ctx = torch.ones(2, 5, 3)
    assert trailing_zero_tokens(ctx) == 0
    ctx[:, 3:] = 0
    assert trailing_zero_tokens(ctx) == 2
    ctx[1, 4, 0] = 1.0  # a token is padding only where it is zero in every batch element
    assert trailing_zero_tokens(ctx) == 0
    assert trailing_zero_tokens(torch.zeros(1, 4, 2)) == 4


def test_collapse_is_the_same_function(transformer):
    hooked = copy.deepcopy(transformer)
    assert collapse_zero_padding(hooked) and collapse_zero_padding(hooked)  # idempotent
    assert getattr(hooked, HOOKED) and not getattr(transformer, HOOKED, False)
    for zeros in (256, 1, 0):
        inputs = _inputs(transformer.config, zeros)
        full, short = _run(transformer, inputs), _run(hooked, inputs)
        assert (full - short).abs().max() < 1e-4, zeros
        if zeros <= 1:  # nothing to collapse: the stock processor, bit for bit
            assert torch.equal(full, short)
    # a deep copy (a frozen reference) collapses through its own processors
    twin = copy.deepcopy(hooked)
    inputs = _inputs(transformer.config, 256, seed=1)
    assert (_run(twin, inputs) - _run(transformer, inputs)).abs().max() < 1e-4
    # processors replaced afterwards: the hook leaves the context whole
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    twin.set_attn_processor(JointAttnProcessor2_0())
    assert torch.equal(_run(twin, inputs), _run(transformer, inputs))
    # not installed over non-stock processors
    other = copy.deepcopy(transformer)
    other.set_attn_processor(CollapsedJointAttnProcessor(4))
    assert not collapse_zero_padding(other) and not getattr(other, HOOKED, False)


def test_loader_collapses_and_images_match_the_plain_pipeline():
    from diffusers import StableDiffusion3Pipeline

    from xdpo.apps.digits.sampling import load_pipeline
    from xdpo.evaluate.pipeline import generate, initial_latents

    fast = load_pipeline("digits-flow")
    assert getattr(fast.transformer, HOOKED, False)
    plain = StableDiffusion3Pipeline.from_pretrained(
        flow_base_model_path(), text_encoder_3=None, tokenizer_3=None
    )
    plain.set_progress_bar_config(disable=True)
    prompts = ["a handwritten digit seven", "the number 4", "a drawing of the numeral two"]
    lat = initial_latents(fast, len(prompts), seed=3)
    kw = {"steps": 6, "guidance": 3.0, "latents": lat, "progress": False}
    a = np.stack([np.asarray(im, dtype=int) for im in generate(fast, prompts, **kw)])
    b = np.stack([np.asarray(im, dtype=int) for im in generate(plain, prompts, **kw)])
    assert np.abs(a - b).max() <= 1  # uint8 rounding


def test_a_swapped_denoiser_is_prepared_by_its_family_as_the_loader_does(transformer, tmp_path):
    from diffusers import UNet2DConditionModel

    from xdpo.apps.digits import base_model_path
    from xdpo.errors import DataError
    from xdpo.evaluate.pipeline import load_pipeline
    from xdpo.models.denoiser import load_denoiser
    from xdpo.models.families import family_of_pipeline

    flow = load_denoiser(flow_base_model_path())  # transformer/: an SD3 transformer, as saved
    assert not getattr(flow, HOOKED, False) and not flow.training
    pipe = load_pipeline(str(flow_base_model_path()), scheduler="default")  # no T5: the padding collapses
    pipe.transformer = flow
    family_of_pipeline(pipe).prepare_sampling(pipe)
    assert getattr(flow, HOOKED, False)
    inputs = _inputs(transformer.config, 256, seed=2)
    assert (_run(flow, inputs) - _run(transformer, inputs)).abs().max() < 1e-4
    unet = load_denoiser(base_model_path())  # unet/: unchanged
    assert isinstance(unet, UNet2DConditionModel) and not getattr(unet, HOOKED, False)
    with pytest.raises(DataError, match="no unet/ or transformer/"):
        load_denoiser(tmp_path)
