"""SDXL, SD3 (with and without T5) and Flux end to end on tiny pipelines in the real diffusers formats:
family detection, training (full and LoRA) to a `final/` that diffusers loads, learning, exact resume,
and the family seam (conditions, time ids, flow sigmas, the denoiser call) against diffusers' own code."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_training
from xdpo.config import load_config
from xdpo.errors import ConfigError
from xdpo.models.small import resolution

SIDE = resolution(8)  # the tiny family pipelines' image size (latents 8 x 8)
CPU = torch.device("cpu")
PIPELINE_CLASS = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
PIPELINE_CLASS |= {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
FIXTURE = {f: f"tiny_{f}_pipeline_dir" for f in ("sdxl", "sd3", "flux")} | {"sd": "tiny_pipeline_dir"}
TRAINED = [("sdxl", {}), ("sd3", {}), ("sd3", {"family.text_encoder_3": "false"}), ("flux", {})]


def run(tmp_path, pipe, pairs, name="run", **overrides):
    """The shared harness (conftest.run_training) at the tiny families' image size."""
    return run_training(
        tmp_path / name,
        pipe,
        pairs,
        **{"family.max_sequence_length": 32, "data.resolution": SIDE, **overrides},
    )


def run_cfg(path, *extra):
    return load_config(None, [f"model.pretrained={path}", "data.path=x", *extra])


def model_cfg(path, *extra):
    return run_cfg(path, *extra).model


def components(path, *extra):
    """The pipeline's components as a run with these overrides loads them (model and family keys)."""
    from xdpo.models.load import load_components

    cfg = run_cfg(path, *extra)
    return load_components(cfg.model, cfg.family)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pipeline_cls(family):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASS[family])


def conditions(comps, captions):
    """The family's training conditions for `captions` (text and, for SDXL, square-image time ids)."""
    fam = comps.family
    cond = fam.encode_text(comps, captions, CPU)
    cond.update(fam.image_conditions(comps, len(captions), (SIDE, SIDE)))
    return cond


# ---- family detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_family_is_read_from_model_index(request, family):
    from xdpo.models.load import check_pipeline

    path = request.getfixturevalue(FIXTURE[family])
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASS[family]
    fam = check_pipeline(str(path))
    assert fam.name == family and fam.pipeline_class == PIPELINE_CLASS[family]


def _relabelled(tmp_path, src, class_name):
    """A pipeline folder whose model_index.json names `class_name` (components linked from `src`)."""
    out = tmp_path / class_name
    out.mkdir()
    for part in src.iterdir():
        if part.is_dir():
            (out / part.name).symlink_to(part, target_is_directory=True)
    index = json.loads((src / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return out


def test_model_family_overrides_model_index(tmp_path, tiny_sd3_pipeline_dir):
    from xdpo.models.load import check_pipeline

    custom = _relabelled(tmp_path, tiny_sd3_pipeline_dir, "MyStableDiffusion3Pipeline")
    with pytest.raises(ConfigError, match="MyStableDiffusion3Pipeline"):
        check_pipeline(str(custom))
    assert check_pipeline(str(custom), "sd3").name == "sd3"
    comps = components(custom, "model.family=sd3")
    assert comps.family.name == "sd3" and type(comps.pipe).__name__ == "StableDiffusion3Pipeline"
    # forcing a family whose denoiser the folder lacks is refused by name
    with pytest.raises(ConfigError, match="lacks component.*unet"):
        check_pipeline(str(tiny_sd3_pipeline_dir), "sdxl")


def test_unsupported_pipeline_is_one_clear_line(tmp_path, tiny_sd3_pipeline_dir):
    from xdpo.models.load import check_pipeline

    custom = _relabelled(tmp_path, tiny_sd3_pipeline_dir, "KandinskyV22Pipeline")
    with pytest.raises(ConfigError) as err:
        check_pipeline(str(custom))
    msg = str(err.value)
    assert "\n" not in msg and "KandinskyV22Pipeline" in msg and "model.family" in msg


# ---- training end to end ---------------------------------------------------------------------------------


def _check_full_final(family, base, final):
    from diffusers import DiffusionPipeline

    from xdpo.models.load import null_components

    fam_cls = pipeline_cls(family)
    # a folder saved without T5 loads with text_encoder_3=None, tokenizer_3=None (diffusers 0.42 asks for them)
    nulls = null_components(json.loads((final / "model_index.json").read_text()))
    denoiser = "unet" if family == "sdxl" else "transformer"
    before = load_file(next((base / denoiser).glob("*.safetensors")))
    after = load_file(next((final / denoiser).glob("*.safetensors")))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert type(DiffusionPipeline.from_pretrained(final, **nulls)) is fam_cls
    return fam_cls.from_pretrained(final, **nulls)


def _check_lora_final(family, base, out, extra):
    """base + load_lora_weights(final) reproduces the trained adapter (checkpoint step-3) in a forward."""
    from peft.utils import set_peft_model_state_dict

    from xdpo.models.load import add_lora

    comps = components(base, *extra)
    fam, cfg = comps.family, model_cfg(base, "model.lora_rank=4", "model.lora_alpha=8")
    trained = type(comps.denoiser).from_pretrained(base, subfolder=fam.denoiser)
    add_lora(trained, cfg)
    adapter = load_file(out / "checkpoints" / "step-3" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    set_peft_model_state_dict(trained, adapter)
    pipe = pipeline_cls(family).from_pretrained(base, **fam.load_kwargs(run_cfg(base).family))
    pipe.load_lora_weights(out / "final")
    cond = conditions(comps, ["a bright picture", "a dark picture"])
    x = torch.randn(2, comps.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        plain = fam.predict(comps.denoiser, x, t, cond)
        a = fam.predict(trained.eval(), x, t, cond)
        b = fam.predict(getattr(pipe, fam.denoiser), x, t, cond)
    assert (a - plain).abs().max() > 1e-5  # the adapter does something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return pipe


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize(("family", "extra"), TRAINED, ids=["sdxl", "sd3", "sd3-no-t5", "flux"])
def test_train_and_load_final(request, tmp_path, pairs_parquet, family, extra, lora):
    base = request.getfixturevalue(FIXTURE[family])
    kw = {**extra, "model.lora_rank": lora}
    if lora:
        kw.update({"model.lora_alpha": 8, "train.learning_rate": 1e-2})  # alpha != rank: scale 2 on loading
    out = run(tmp_path, base, pairs_parquet, **kw)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    info = json.loads((out / "final" / "xdpo.json").read_text())
    assert [info["family"], info["pipeline_class"], info["lora"]] == [
        family,
        PIPELINE_CLASS[family],
        bool(lora),
    ]
    if lora:
        pipe = _check_lora_final(family, base, out, [f"{k}={v}" for k, v in extra.items()])
    else:
        pipe = _check_full_final(family, base, out / "final")
        if extra.get("family.text_encoder_3") == "false":
            assert pipe.text_encoder_3 is None  # final/ keeps the components the run trained with
    check_image(pipe)


def check_image(pipe):
    """Two inference steps at the tiny size give a finite, non-constant image."""
    image = pipe("a bright picture", num_inference_steps=2, height=SIDE, width=SIDE, output_type="np").images[
        0
    ]
    assert image.shape == (SIDE, SIDE, 3) and np.isfinite(image).all() and float(image.std()) > 0


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_fixed_batch_loss_falls(request, pairs_parquet, family, lora):
    """`train_step` + AdamW on one fixed batch and fixed (t, noise): the loss falls, accuracy 1."""
    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    base = request.getfixturevalue(FIXTURE[family])
    cfg = load_config(
        None,
        [f"model.pretrained={base}", f"data.path={pairs_parquet}", f"data.resolution={SIDE}",
         f"model.lora_rank={lora}", "family.max_sequence_length=32", "loss.beta=1000"],
    )  # fmt: skip
    m, models = single_process(cfg, CPU)
    params = models.params
    pairs = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=SIDE)
    batch = collate_pairs([pairs[(i, 0)] for i in range(4)])
    opt = torch.optim.AdamW(params, lr=1e-2 if lora else 1e-3)
    history = []
    for _ in range(12):
        out = train_step(m, batch, torch.Generator().manual_seed(7)).out
        out.loss.mean().backward()
        opt.step()
        opt.zero_grad()
        history.append((out.loss.mean().item(), out.implicit_acc))
    # policy == reference at the start, up to float32 rounding: autograd and inference kernels can differ in
    # the last bit (SDXL's UNet on CPU: errors 1e-7 apart), which also decides the initial accuracy
    assert history[0][0] == pytest.approx(np.log(2), abs=1e-4)
    assert history[-1][0] < 0.5 * history[0][0], history
    assert history[-1][1] == 1.0


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_flux_resume_equals_uninterrupted_run(tmp_path, tiny_flux_pipeline_dir, pairs_parquet, lora):
    kw = {"model.lora_rank": lora, "data.flip": "pair", "data.prompt_dropout": 0.3}
    if lora:
        kw["train.learning_rate"] = 1e-2
    fresh = run(tmp_path, tiny_flux_pipeline_dir, pairs_parquet, name="fresh", **{"train.max_steps": 5}, **kw)
    run(tmp_path, tiny_flux_pipeline_dir, pairs_parquet, name="part", **{"train.max_steps": 3}, **kw)
    resumed = run(
        tmp_path, tiny_flux_pipeline_dir, pairs_parquet, name="part",
        **{"train.max_steps": 5, "train.resume_from": "latest"}, **kw,
    )  # fmt: skip
    a, b = read_metrics(fresh), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    untimed = [{k: v for k, v in r.items() if k != "step_time"} for r in a + b]
    assert untimed[:5] == untimed[5:]  # every metric of every step, exactly
    weights = "checkpoints/step-5/adapter_model.safetensors" if lora else "final/transformer/"
    weights += "" if lora else "diffusion_pytorch_model.safetensors"
    wa, wb = (load_file(o / weights) for o in (fresh, resumed))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---- the seam against diffusers' own code ----------------------------------------------------------------


def test_sdxl_time_ids_equal_the_pipeline(tiny_sdxl_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    from xdpo.models.families import sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    proj = pipe.text_encoder_2.config.projection_dim
    cases = [
        ((1024, 768), (0, 0), (512, 512)),
        ((480, 640), (16, 32), (384, 512)),
        ((16, 16), (0, 0), (16, 16)),
    ]
    expected = torch.cat([pipe._get_add_time_ids(o, c, t, torch.float32, proj) for o, c, t in cases])
    orig = torch.tensor([o for o, _, _ in cases])
    crop = torch.tensor([c for _, c, _ in cases])
    got = torch.cat([sdxl.time_ids(orig[i : i + 1], crop[i : i + 1], cases[i][2]) for i in range(len(cases))])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # image_conditions: recorded sizes and crops, else the image's own size and crop (0, 0), for [w; l]
    sizes = {"original_size": orig[1:2].repeat(2, 1), "crop_top_left": crop[1:2].repeat(2, 1)}
    got = sdxl.image_conditions(None, 2, (384, 512), sizes)["time_ids"]
    torch.testing.assert_close(got, expected[1:2].repeat(2, 1))
    square = sdxl.image_conditions(None, 2, (16, 16))["time_ids"]
    torch.testing.assert_close(square, expected[2:3].repeat(2, 1))


def test_sd3_flow_process_equals_the_scheduler(tiny_sd3_pipeline_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from xdpo.models.noise import FlowProcess

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_pipeline_dir, subfolder="scheduler")
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting
    proc = FlowProcess(sched)
    n = proc.num_steps
    # the training sigmas of the scheduler (descending) are the process's, ascending in k
    torch.testing.assert_close(proc.sigmas.flip(0).float(), sched.sigmas[:n].float(), rtol=1e-6, atol=1e-7)
    k = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(
        proc.model_timestep(k), sched.timesteps[n - 1 - k].float(), rtol=1e-6, atol=1e-4
    )
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    x_t, target = proc.noise(x0, eps, k)
    s = sched.sigmas[n - 1 - k].double().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ((1 - s) * x0 + s * eps).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, eps - x0)
    # the scheduler's own forward process (`scale_noise`) at the same sigma
    torch.testing.assert_close(
        x_t, sched.scale_noise(x0, sched.timesteps[n - 1 - k], eps), rtol=1e-5, atol=1e-5
    )


def test_flux_dynamic_shift_equals_the_pipeline(tiny_flux_pipeline_dir, pairs_parquet):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from xdpo.models.load import load_components
    from xdpo.train.setup import make_process

    cfg = load_config(
        None, [f"model.pretrained={tiny_flux_pipeline_dir}", "data.path=x", f"data.resolution={SIDE}"]
    )
    comps = load_components(cfg.model, cfg.family)
    proc = make_process(cfg, comps)
    pipe, sc = comps.pipe, comps.scheduler.config
    assert sc.use_dynamic_shifting
    # the image token count FluxPipeline packs at this resolution, and its mu
    latents, _ = pipe.prepare_latents(
        1, pipe.transformer.config.in_channels // 4, SIDE, SIDE, torch.float32, CPU, None
    )
    mu = calculate_shift(
        latents.shape[1], sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift
    )
    n = proc.num_steps
    sched = type(comps.scheduler).from_config(sc)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # FluxPipeline.__call__ with n steps
    torch.testing.assert_close(proc.sigmas.flip(0).float(), sched.sigmas[:n].float(), rtol=1e-5, atol=1e-6)
    assert proc.sigmas[0] > 1 / n  # shifted towards noise (mu > 0)
    # pack -> unpack in predict is FluxPipeline's own layout
    x = torch.randn(2, 16, 8, 8)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 8)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, SIDE, SIDE, pipe.vae_scale_factor), x)


CALLS = [  # (fixture, model overrides, pipeline call kwargs)
    ("tiny_sdxl_pipeline_dir", [], {"guidance_scale": 1.0}),
    ("tiny_sd3_pipeline_dir", [], {"guidance_scale": 1.0}),
    ("tiny_sd3_pipeline_dir", ["family.text_encoder_3=false"], {"guidance_scale": 1.0}),
    ("tiny_flux_pipeline_dir", [], {"guidance_scale": 3.5}),
    ("tiny_flux_schnell_pipeline_dir", [], {}),
]


@pytest.mark.parametrize(
    ("fixture", "extra", "call"), CALLS, ids=["sdxl", "sd3", "sd3-no-t5", "flux", "flux-schnell"]
)
def test_conditions_and_predict_equal_the_pipeline(request, fixture, extra, call):
    """encode_text (+ image_conditions) equal the pipeline's encode_prompt and what its __call__ feeds the
    denoiser (at the pipeline's default max_sequence_length); predict reproduces the denoiser's output."""
    from diffusers import FluxPipeline

    path = request.getfixturevalue(fixture)
    comps = components(path, "family.guidance=3.5", *extra)
    fam, pipe = comps.family, comps.pipe
    captions = ["a bright picture, number 3"]
    cond = conditions(comps, captions)
    fresh = pipeline_cls(fam.name).from_pretrained(path, **fam.load_kwargs(run_cfg(path, *extra).family))
    more_prompts = {"sdxl": [None], "sd3": [None, None], "flux": []}[fam.name]  # prompt_2 (, prompt_3)
    no_cfg = {} if fam.name == "flux" else {"do_classifier_free_guidance": False}
    with torch.no_grad():  # as the pipeline's __call__ (the attention kernel can differ with autograd on)
        enc = fresh.encode_prompt(captions, *more_prompts, **no_cfg)
    embeds, pooled = (enc[0], enc[1]) if fam.name == "flux" else (enc[0], enc[2])
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["text_embeds" if fam.name == "sdxl" else "pooled_projections"], pooled)

    seen = {}
    model = getattr(pipe, fam.denoiser)
    hook = model.register_forward_hook(
        lambda mod, a, kw, out: seen.update(a=a, kw=kw, out=out), with_kwargs=True
    )
    try:
        pipe(captions, num_inference_steps=1, height=SIDE, width=SIDE, output_type="latent", **call)
    finally:
        hook.remove()
    kw = seen["kw"]
    if fam.name == "sdxl":
        noisy, t, out = seen["a"][0], seen["a"][1], seen["out"][0]
        torch.testing.assert_close(kw["added_cond_kwargs"]["time_ids"], cond["time_ids"])
        torch.testing.assert_close(kw["added_cond_kwargs"]["text_embeds"], cond["text_embeds"])
    elif fam.name == "sd3":
        noisy, t, out = kw["hidden_states"], kw["timestep"], seen["out"][0]
        torch.testing.assert_close(kw["pooled_projections"], cond["pooled_projections"])
    else:
        unpack = lambda z: FluxPipeline._unpack_latents(z, SIDE, SIDE, pipe.vae_scale_factor)  # noqa: E731
        # t = 1000 sigma in float64, so that predict's t / 1000 gives back the pipeline's sigma exactly
        noisy, t, out = unpack(kw["hidden_states"]), kw["timestep"].double() * 1000, unpack(seen["out"][0])
        torch.testing.assert_close(kw["pooled_projections"], cond["pooled_projections"])
        assert (kw["guidance"] is None) == ("guidance" not in cond)
        if "guidance" in cond:
            torch.testing.assert_close(kw["guidance"], cond["guidance"])
    torch.testing.assert_close(kw["encoder_hidden_states"], cond["encoder_hidden_states"])
    with torch.no_grad():
        pred = fam.predict(model, noisy, t.expand(noisy.shape[0]), cond)
    torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)


def test_sd35_transformer_trains(tmp_path, clip_tokenizer_dir, t5_tokenizer_dir, pairs_parquet):
    """SD3.5's transformer (qk RMS norm, dual attention), from a folder saved without T5 (model_index.json
    null entries, loaded with family.text_encoder_3 left true): LoRA steps, final/ loads."""
    from diffusers import StableDiffusion3Pipeline

    from xdpo.models.small import build_pipeline

    base = build_pipeline(
        "StableDiffusion3Pipeline",
        tmp_path / "sd35",
        sd35=True,
        with_t5=False,
        tokenizer_dir=clip_tokenizer_dir,
        t5_tokenizer_dir=t5_tokenizer_dir,
    )
    out = run(tmp_path, base, pairs_parquet, **{"model.lora_rank": 4, "train.max_steps": 2})
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.qk_norm == "rms_norm"
    pipe.load_lora_weights(out / "final")
    check_image(pipe)


def test_sample_drives_every_family(
    tmp_path, tiny_sdxl_pipeline_dir, tiny_sd3_pipeline_dir, tiny_flux_pipeline_dir
):
    """`xdpo sample` loads each family's pipeline (with its own sampler for flow models) and writes images."""
    from xdpo.cli import main
    from xdpo.evaluate.sample import read_manifest

    for name, pipe in (
        ("sdxl", tiny_sdxl_pipeline_dir),
        ("sd3", tiny_sd3_pipeline_dir),
        ("flux", tiny_flux_pipeline_dir),
    ):
        out = tmp_path / name
        args = ["sample", "--model", str(pipe), "--prompts", str(_prompts(tmp_path)), "--seeds", "0-1"]
        assert main([*args, "--steps", "2", "--out", str(out)]) == 0
        rows = read_manifest(out)
        assert len(rows) == 4 and all((out / r["file"]).is_file() for r in rows)
        if name != "sdxl":
            assert rows[0]["scheduler_class"].startswith("FlowMatch")


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square\na blue circle\n")
    return path


COMPOSED = [  # every strategy on the new families: objectives, reference strategies, timestep strategies
    ("sd3", {"loss.objective": "kto", "reference.strategy": "periodic", "reference.update_every": 1,
             "reference.max_divergence": 10, "model.lora_rank": 4, "timesteps.sampling": "skewed",
             "timesteps.weighting": "snr"}),
    ("flux", {"loss.divergence": "js", "reference.strategy": "ema", "reference.update_every": 1,
              "loss.beta_schedule": "flow"}),
    ("flux", {"loss.objective": "sft", "loss.error_space": "epsilon", "timesteps.weighting": "snr"}),
    ("sdxl", {"loss.divergence": "xdpo", "loss.outer": "ipo", "reference.strategy": "periodic",
              "reference.update_every": 1, "reference.max_divergence": 10, "data.ties": "keep"}),
]  # fmt: skip


@pytest.mark.parametrize(("family", "extra"), COMPOSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(COMPOSED)])
def test_strategies_compose_on_every_family(request, tmp_path, pairs_parquet, family, extra):
    out = run(tmp_path, request.getfixturevalue(FIXTURE[family]), pairs_parquet, **extra)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if extra.get("reference.strategy") in ("periodic", "ema"):
        assert rows[-1]["ref_updates"] == 3
    if "timesteps.weighting" in extra or "loss.beta_schedule" in extra:
        assert any(r["lambda_mean"] != 1.0 for r in rows)


def test_resolution_off_the_patch_grid_is_one_clear_line(tmp_path, tiny_flux_pipeline_dir, pairs_parquet):
    """Flux packs 2 x 2 latent patches: behind an 8x VAE, 40 px (latents 5 x 5) cannot be packed. Training and
    `xdpo cache` stop before any work with one line naming data.resolution and the multiple (16 px), instead
    of failing inside the packing's `view`."""
    from xdpo.models.small.components import vae
    from xdpo.models.small.pipelines import FLUX_VAE
    from xdpo.train.cache_cli import build_cache

    variant = _relabelled(tmp_path, tiny_flux_pipeline_dir, "FluxPipeline")
    (variant / "vae").unlink()
    vae(latent_channels=16, blocks=(8, 8, 8, 8), norm_groups=4, quant_conv=False, **FLUX_VAE).save_pretrained(
        variant / "vae"
    )
    for attempt in (
        lambda: run(tmp_path, variant, pairs_parquet, **{"data.resolution": 40}),
        lambda: build_cache(
            load_config(
                None,
                [
                    f"model.pretrained={variant}",
                    f"data.path={pairs_parquet}",
                    "data.resolution=40",
                    f"data.cache={tmp_path / 'cache'}",
                ],
            )  # fmt: skip
        ),
    ):
        with pytest.raises(ConfigError) as err:
            attempt()
        msg = str(err.value)
        assert (
            "\n" not in msg
            and msg.startswith("config key `data.resolution`: 40 px")
            and "multiple of 16" in msg
        )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
