"""The seam of Qwen-Image, FLUX.2 [dev] and [klein], Z-Image and Wan against each pipeline's own code: the
conditions equal `encode_prompt` and what `__call__` feeds the denoiser, `predict` reproduces the denoiser's
output there, latents are normalised (and patchified) as the pipelines' own image encoders do, and the
training sigmas are the scheduler's (with the mu each pipeline computes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import RECENT_PIPELINES
from xdpo.config import load_config

CPU = torch.device("cpu")
CAPTIONS = ["a bright picture, number 3", "a cat"]  # two lengths: padding and masks are exercised


def comps_of(path, *extra):
    from xdpo.models.load import load_components

    cfg = load_config(None, [f"model.pretrained={path}", "data.path=x", *extra])
    return load_components(cfg.model, cfg.family)


def fresh(path, family):
    import diffusers

    return getattr(diffusers, RECENT_PIPELINES[family]).from_pretrained(path)


def hooked_call(pipe, model, **call):
    """Run the pipeline (2 steps: Qwen-Image's shift_terminal stretch divides by zero at 1); return the
    denoiser's (args, kwargs, output) of its first call."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen.setdefault("call", (args, kwargs, out))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=CAPTIONS, num_inference_steps=2, output_type="latent", **call)
    finally:
        handle.remove()
    return seen["call"]


def test_qwenimage_conditions_and_predict_equal_the_pipeline(tiny_qwenimage_pipeline_dir):
    from xdpo.models.families.qwenimage import trimmed_text, unpack

    comps = comps_of(tiny_qwenimage_pipeline_dir)
    fam, pipe = comps.family, comps.pipe
    cond = fam.encode_text(comps, CAPTIONS, CPU)
    with torch.no_grad():
        embeds, mask = fresh(tiny_qwenimage_pipeline_dir, "qwenimage").encode_prompt(
            CAPTIONS, max_sequence_length=512
        )
    n = embeds.shape[1]
    assert cond["encoder_hidden_states"].shape[1] == 512 and mask is not None and not bool(mask.all())
    torch.testing.assert_close(cond["encoder_hidden_states"][:, :n], embeds)
    assert (
        torch.equal(cond["encoder_hidden_states_mask"][:, :n], mask)
        and not cond["encoder_hidden_states"][:, n:].any()
    )
    _, kw, out = hooked_call(pipe, pipe.transformer, height=16, width=16, true_cfg_scale=1.0)
    text, tmask = trimmed_text(cond)
    torch.testing.assert_close(kw["encoder_hidden_states"], text)
    assert torch.equal(kw["encoder_hidden_states_mask"], tmask)
    assert kw["img_shapes"] == [[(1, 4, 4)]] * 2
    noisy = unpack(kw["hidden_states"], 4, 8, 8)
    with torch.no_grad():
        pred = fam.predict(pipe.transformer, noisy, kw["timestep"].double() * 1000, cond)
    torch.testing.assert_close(pred, unpack(out[0], 4, 8, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
def test_flux2_conditions_and_predict_equal_the_pipeline(request, family):
    path = request.getfixturevalue(f"tiny_{family}_pipeline_dir")
    comps = comps_of(path)
    fam, pipe = comps.family, comps.pipe
    cond = fam.encode_text(comps, CAPTIONS, CPU)
    with torch.no_grad():
        embeds, _ = fresh(path, family).encode_prompt(CAPTIONS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    _, kw, out = hooked_call(
        pipe, pipe.transformer, height=16, width=16, guidance_scale=4.0 if family == "flux2" else 1.0
    )
    torch.testing.assert_close(kw["encoder_hidden_states"], cond["encoder_hidden_states"])
    if family == "flux2":  # guidance-distilled: the embedded guidance per sample; klein passes none
        torch.testing.assert_close(kw["guidance"], cond["guidance"])
    else:
        assert kw["guidance"] is None and "guidance" not in cond
    unpack = lambda z: z.permute(0, 2, 1).reshape(2, 16, 4, 4)  # noqa: E731 - row-major ids (checked below)
    assert torch.equal(kw["img_ids"][0, :, 1:3], torch.cartesian_prod(torch.arange(4), torch.arange(4)))
    with torch.no_grad():
        pred = fam.predict(
            pipe.transformer, unpack(kw["hidden_states"]), kw["timestep"].double() * 1000, cond
        )
    torch.testing.assert_close(pred, unpack(out[0]), rtol=1e-5, atol=1e-5)


def test_zimage_conditions_and_predict_equal_the_pipeline(tiny_zimage_pipeline_dir):
    comps = comps_of(tiny_zimage_pipeline_dir)
    fam, pipe = comps.family, comps.pipe
    cond = fam.encode_text(comps, list(CAPTIONS), CPU)
    with torch.no_grad():
        embeds, _ = fresh(tiny_zimage_pipeline_dir, "zimage").encode_prompt(
            list(CAPTIONS), do_classifier_free_guidance=False
        )
    mask = cond["encoder_attention_mask"]
    assert [int(m.sum()) for m in mask] == [e.shape[0] for e in embeds]
    for e, got, m in zip(embeds, cond["encoder_hidden_states"], mask, strict=True):
        torch.testing.assert_close(got[m], e)
    args, _, out = hooked_call(pipe, pipe.transformer, height=16, width=16, guidance_scale=0.0)
    x, t_in, caps = args
    for a, b in zip(caps, embeds, strict=True):
        torch.testing.assert_close(a, b)
    noisy = torch.stack(x).squeeze(2)
    with torch.no_grad():
        pred = fam.predict(pipe.transformer, noisy, 1000 - 1000 * t_in.double(), cond)
    torch.testing.assert_close(
        pred, -torch.stack(out[0]).squeeze(2), rtol=1e-5, atol=1e-5
    )  # x0 - eps negated


def test_wan_conditions_and_predict_equal_the_pipeline(tiny_wan_pipeline_dir):
    comps = comps_of(tiny_wan_pipeline_dir)
    fam, pipe = comps.family, comps.pipe
    cond = fam.encode_text(comps, CAPTIONS, CPU)
    with torch.no_grad():
        embeds, _ = fresh(tiny_wan_pipeline_dir, "wan").encode_prompt(
            CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=512
        )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    _, kw, out = hooked_call(pipe, pipe.transformer, height=32, width=32, num_frames=5, guidance_scale=1.0)
    torch.testing.assert_close(kw["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert kw["hidden_states"].shape == (2, 4, 2, 8, 8) and kw["timestep"].dtype == torch.int64
    with torch.no_grad():
        pred = fam.predict(pipe.transformer, kw["hidden_states"], kw["timestep"].double(), cond)
    torch.testing.assert_close(pred, out[0], rtol=1e-5, atol=1e-5)


# ---- latents: each pipeline's own image (video) encoder ------------------------------------------------------


def test_latents_are_normalised_as_the_pipelines_encoders_do(
    tiny_qwenimage_pipeline_dir, tiny_flux2_pipeline_dir, tiny_wan_pipeline_dir
):
    """Qwen-Image's img2img `_encode_vae_image`, FLUX.2's `_encode_vae_image` (patchify + batch norm) and Wan's
    video2video `prepare_latents` (noise off) give the family's `to_latents` of the same posterior draw."""
    from diffusers import QwenImageImg2ImgPipeline, WanVideoToVideoPipeline

    g = torch.Generator().manual_seed(0)
    images, clips = (
        torch.rand(2, 3, 16, 16, generator=g) * 2 - 1,
        torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1,
    )
    with torch.no_grad():
        qwen = comps_of(tiny_qwenimage_pipeline_dir)
        ours = qwen.family.to_latents(
            qwen.vae, qwen.family.posterior(qwen.vae, images).sample(torch.Generator().manual_seed(1))
        )
        theirs = QwenImageImg2ImgPipeline(**qwen.pipe.components)._encode_vae_image(
            images.unsqueeze(2), torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(ours, theirs.squeeze(2))
        flux2 = comps_of(tiny_flux2_pipeline_dir)
        ours = flux2.family.to_latents(flux2.vae, flux2.family.posterior(flux2.vae, images).mode())
        torch.testing.assert_close(ours, flux2.pipe._encode_vae_image(images, None))
        assert ours.shape == (2, 16, 4, 4) and ours.std() > 0
        wan = comps_of(tiny_wan_pipeline_dir)
        parts = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
        v2v = WanVideoToVideoPipeline(**{k: wan.pipe.components[k] for k in parts})
        v2v.scheduler.add_noise = lambda x, noise, t: x  # the latents before noising
        theirs = v2v.prepare_latents(
            clips, 1, 4, 32, 32, torch.float32, CPU, None, timestep=torch.tensor([0])
        )
        ours = wan.family.to_latents(wan.vae, wan.family.posterior(wan.vae, clips).mode())
        torch.testing.assert_close(ours, theirs)
        assert ours.shape == (1, 4, 2, 8, 8)


# ---- sigmas: the scheduler's, with the mu each pipeline computes ----------------------------------------------


def process_of(path, resolution, *extra):
    from xdpo.models.load import load_components
    from xdpo.train.setup import make_process

    cfg = load_config(
        None, [f"model.pretrained={path}", "data.path=x", f"data.resolution={resolution}", *extra]
    )
    comps = load_components(cfg.model, cfg.family)
    return make_process(cfg, comps), comps


def captured_mu(pipe, steps, **call):
    """The mu the pipeline hands its scheduler's `set_timesteps` in a call."""
    import functools

    seen = {}
    original = pipe.scheduler.set_timesteps

    @functools.wraps(original)  # the pipelines read its signature (does it take sigmas?)
    def spy(*args, **kwargs):
        seen["mu"] = kwargs.get("mu")
        return original(*args, **kwargs)

    pipe.scheduler.set_timesteps = spy
    try:
        pipe(prompt="a cat", num_inference_steps=steps, output_type="latent", **call)
    finally:
        pipe.scheduler.set_timesteps = original
    return seen["mu"]


@pytest.mark.parametrize(("family", "steps"), [("qwenimage", 2), ("flux2", 50), ("flux2_klein", 50)])
def test_dynamic_sigmas_equal_the_scheduler_at_the_pipelines_mu(request, family, steps):
    """The training sigmas are the scheduler's N-step sigmas shifted by the mu the pipeline samples with at
    the training resolution (FLUX.2: at its default 50 steps; Qwen-Image: with its shift_terminal 0.02)."""
    path = request.getfixturevalue(f"tiny_{family}_pipeline_dir")
    proc, comps = process_of(path, 32)
    call = {"true_cfg_scale": 1.0} if family == "qwenimage" else {"guidance_scale": 1.0}
    mu = captured_mu(comps.pipe, steps, height=32, width=32, **call)
    n = proc.num_steps
    sched = type(comps.scheduler).from_config(comps.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    torch.testing.assert_close(proc.sigmas.flip(0).float(), sched.sigmas[:n].float(), rtol=1e-5, atol=1e-6)
    if family == "qwenimage":
        assert float(proc.sigmas[0]) == pytest.approx(0.02)  # stretched to shift_terminal
    proc_4, _ = process_of(path, 32, "family.shift_steps=4") if family != "qwenimage" else (proc, None)
    assert family == "qwenimage" or not torch.equal(proc_4.sigmas, proc.sigmas)  # the steps' mu moves them


def test_static_and_solver_sigmas_equal_the_scheduler(tiny_zimage_pipeline_dir, tiny_wan_pipeline_dir):
    """Z-Image: FlowMatchEuler's training sigmas at shift 3 (what it holds before `set_timesteps`, as SD3's);
    Wan: UniPC's own N-step flow sigmas (shift 3), whose integer timesteps its pipeline feeds the transformer."""
    proc, comps = process_of(tiny_zimage_pipeline_dir, 16)
    n = proc.num_steps
    sched = type(comps.scheduler).from_config(comps.scheduler.config)
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    torch.testing.assert_close(proc.sigmas.flip(0).float(), sched.sigmas[:n].float(), rtol=1e-6, atol=1e-7)
    proc, comps = process_of(tiny_wan_pipeline_dir, 32, "data.num_frames=5")
    sched = type(comps.scheduler).from_config(comps.scheduler.config)
    sched.set_timesteps(n)
    assert comps.scheduler.config.flow_shift == 3.0 and proc.sigmas[n // 2] > 0.5  # shifted towards noise
    torch.testing.assert_close(proc.sigmas.flip(0).float(), sched.sigmas[:n].float(), rtol=0, atol=0)
    k = torch.tensor([0, 17, 500, 999])
    assert torch.equal(proc.model_timestep(k).floor().long(), sched.timesteps[n - 1 - k])
