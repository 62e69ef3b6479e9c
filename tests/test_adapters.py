"""Adapters and quantised bases: int8 / nf4 / fp8 frozen bases under LoRA (SD and Flux), the memory they
save, DoRA / LoKr / LoHa, an EMA of the trained weights, noise offset; each final/ loads back."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import run_training
from xdpo.config import load_config


def fixed_batch_losses(pipe, pairs, resolution, *overrides, steps=8, lr=3e-3):
    """The loop's own step on one fixed batch and fixed (t, noise): the loss of every step."""
    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    cfg = load_config(
        None,
        [f"model.pretrained={pipe}", f"data.path={pairs}", f"data.resolution={resolution}",
         "model.lora_rank=4", "loss.beta=1000", *overrides],
    )  # fmt: skip
    ctx, models = single_process(cfg)
    data = PreferencePairs(load_preference_table(str(pairs)), resolution=resolution)
    batch = collate_pairs([data[(i, 0)] for i in range(4)])
    opt = torch.optim.AdamW(models.params, lr=lr)
    losses = []
    for _ in range(steps):
        out = train_step(ctx, batch, torch.Generator().manual_seed(7)).out
        out.loss.mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.mean().item())
    return losses, models


@pytest.mark.parametrize(
    ("fixture", "resolution", "mode"),
    [("tiny_pipeline_dir", 32, "int8"), ("tiny_pipeline_dir", 32, "nf4"), ("tiny_pipeline_dir", 32, "fp8"),
     ("tiny_flux_pipeline_dir", 16, "nf4"), ("tiny_flux_pipeline_dir", 16, "fp8")],
)  # fmt: skip
def test_lora_on_a_quantised_base_learns(request, pairs_parquet, fixture, resolution, mode):
    from xdpo.models.quantize import Float8Linear

    pipe = request.getfixturevalue(fixture)
    losses, models = fixed_batch_losses(pipe, pairs_parquet, resolution, f"model.quantize={mode}")
    assert losses[0] == pytest.approx(0.693147, abs=1e-4)  # policy == reference (adapters off) at start
    assert losses[-1] < 0.6 * losses[0]
    base = {"int8": "Linear8bitLt", "nf4": "Linear4bit", "fp8": Float8Linear.__name__}[mode]
    layers = [type(m.base_layer).__name__ for m in models.policy.modules() if hasattr(m, "base_layer")]
    assert layers and set(layers) == {base}
    assert models.reference.storage.base is models.policy  # the reference shares the quantised base
    assert all(p.dtype == torch.float32 for p in models.params)


def test_quantised_flux_holds_a_fraction_of_the_memory_and_the_estimate_knows(tiny_flux_pipeline_dir):
    from diffusers import FluxTransformer2DModel

    from xdpo.models.families import get_family
    from xdpo.models.quantize import footprint, quantize_model
    from xdpo.train.memory import estimate, meta_modules

    base = FluxTransformer2DModel.from_pretrained(tiny_flux_pipeline_dir, subfolder="transformer")
    bf16 = footprint(copy.deepcopy(base).to(torch.bfloat16))
    ratios = {}
    for mode in ("int8", "nf4", "fp8"):
        model = copy.deepcopy(base)
        assert quantize_model(model, mode, "cpu", torch.bfloat16) > 0
        ratios[mode] = footprint(model) / bf16
        cfg = load_config(
            None,
            [f"model.pretrained={tiny_flux_pipeline_dir}", "data.path=x", "model.lora_rank=4",
             f"model.quantize={mode}", "train.mixed_precision=bf16"],
        )  # fmt: skip
        meta = meta_modules(str(tiny_flux_pipeline_dir), get_family("flux"), cfg)
        est = estimate(meta, "transformer", cfg)
        trained = 4 * est["_trainable"]
        assert est["denoiser weights"] - trained == pytest.approx(footprint(model), rel=0.05)
    # the tiny Flux's Linear layers hold ~93% of its weights: int8 and fp8 ~0.55 of bf16, nf4 ~0.3
    assert ratios["int8"] < 0.6 and ratios["fp8"] < 0.6 and ratios["nf4"] < 0.35, ratios


def images_of(pipe_dir, lora=None):
    from xdpo.evaluate.pipeline import generate, load_pipeline

    pipe = load_pipeline(pipe_dir, lora=lora, scheduler="ddim", device="cpu", dtype="fp32")
    images = generate(pipe, ["a bright picture"] * 2, steps=2, progress=False)
    return torch.tensor(np.stack([np.asarray(im) for im in images]), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_each_adapter_kind_learns(tiny_pipeline_dir, pairs_parquet, kind):
    losses, models = fixed_batch_losses(tiny_pipeline_dir, pairs_parquet, 32, f"model.lora_type={kind}")
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # falls every step
    assert losses[-1] < 0.9 * losses[0], losses
    names = {n.split(".")[-2] for n, p in models.policy.named_parameters() if p.requires_grad}
    expected = {"dora": "lora_magnitude_vector", "lokr": "lokr_w1", "loha": "hada_w1_a"}[kind]
    assert any(expected in n for n, _ in models.policy.named_parameters()), names


@pytest.mark.parametrize(
    ("kind", "quantize"), [("lora", "int8"), ("dora", "nf4"), ("lokr", "none"), ("loha", "fp8")]
)
def test_final_of_each_adapter_loads_on_the_full_precision_base(
    tmp_path, tiny_pipeline_dir, pairs_parquet, kind, quantize
):
    out = run_training(
        tmp_path / kind, tiny_pipeline_dir, pairs_parquet,
        **{"model.lora_rank": 4, "model.lora_type": kind, "model.quantize": quantize, "train.max_steps": 2},
    )  # fmt: skip
    files = {p.name for p in (out / "final").iterdir()}
    peft_format = kind in ("lokr", "loha")
    assert ("adapter_config.json" in files) == peft_format
    assert ("pytorch_lora_weights.safetensors" in files) != peft_format
    base, tuned = images_of(tiny_pipeline_dir), images_of(tiny_pipeline_dir, lora=out / "final")
    assert (base - tuned).abs().max() > 0  # the adapter is on the fp32 base and changes its samples
    if kind == "dora":  # diffusers' loader read it as DoRA
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        pipe.load_lora_weights(out / "final")
        assert any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())


def test_flux_lora_on_nf4_base_saves_a_final_that_loads(tmp_path, tiny_flux_pipeline_dir, pairs_parquet):
    out = run_training(
        tmp_path / "flux", tiny_flux_pipeline_dir, pairs_parquet,
        **{"model.lora_rank": 4, "model.quantize": "nf4", "data.resolution": 16, "train.max_steps": 2,
           "model.quantize_text_encoders": "int8"},
    )  # fmt: skip
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir)
    pipe.load_lora_weights(out / "final")
    assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())


def test_ema_is_saved_beside_final_and_resumes_exactly(tmp_path, tiny_pipeline_dir, pairs_parquet):
    from safetensors.torch import load_file

    kw = {"model.lora_rank": 4, "train.ema_decay": 0.9, "train.max_steps": 4}
    fresh = run_training(tmp_path / "fresh", tiny_pipeline_dir, pairs_parquet, **kw)
    run_training(tmp_path / "part", tiny_pipeline_dir, pairs_parquet, **{**kw, "train.max_steps": 2,
                                                                           "train.checkpoint_every": 2})  # fmt: skip
    part = run_training(
        tmp_path / "part", tiny_pipeline_dir, pairs_parquet, **{**kw, "train.resume_from": "latest"}
    )
    name = "pytorch_lora_weights.safetensors"
    trained, ema = load_file(fresh / "final" / name), load_file(fresh / "final-ema" / name)
    assert trained.keys() == ema.keys() and any(not torch.equal(trained[k], ema[k]) for k in trained)
    resumed = load_file(part / "final-ema" / name)
    assert all(torch.equal(ema[k], resumed[k]) for k in ema)
    assert (
        images_of(tiny_pipeline_dir, lora=fresh / "final-ema") - images_of(tiny_pipeline_dir)
    ).abs().max() > 0


def test_noise_offset_shifts_the_noise_per_channel(tiny_pipeline_dir, pairs_parquet):
    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", f"data.path={pairs_parquet}",
                             "data.resolution=32", "model.lora_rank=4"])  # fmt: skip
    ctx, _ = single_process(cfg)
    data = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=32)
    batch = collate_pairs([data[(i, 0)] for i in range(2)])
    seen = []
    original = ctx.process.noise

    def spy(latents, eps, t):
        seen.append(eps.clone())
        return original(latents, eps, t)

    ctx.process.noise = spy
    for offset in (0.0, 0.0, 2.0):
        ctx.noise_offset = offset
        train_step(ctx, batch, torch.Generator().manual_seed(3))
    plain, again, shifted = seen
    assert torch.equal(plain, again)
    shift = (shifted - plain).mean(dim=(2, 3))
    assert torch.allclose(shifted - plain, shift[..., None, None].expand_as(plain), atol=1e-5)
    assert shift.abs().mean() > 0.5  # ~ 2 |N(0, 1)|
    n = shift.shape[0] // 2
    assert torch.equal(shift[:n], shift[n:])  # the pair's two images share their noise, offset included


def test_quantize_needs_lora(tiny_pipeline_dir):
    from xdpo.errors import ConfigError

    base = [f"model.pretrained={tiny_pipeline_dir}", "data.path=x"]
    with pytest.raises(ConfigError, match="model.quantize"):
        load_config(None, [*base, "model.quantize=int8"])
    with pytest.raises(ConfigError, match="model.lora_type"):
        load_config(None, [*base, "model.quantize=int8", "model.lora_rank=4", "model.lora_type=dora"])
