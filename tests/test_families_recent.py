"""Qwen-Image, FLUX.2 [dev], FLUX.2 [klein], Z-Image and Wan end to end on tiny pipelines in the real diffusers
formats: detection, full and LoRA training to a `final/` their pipelines load and sample from, learning on a
fixed batch, exact resume, and the seam against each pipeline's own code (conditions = `encode_prompt` and what
`__call__` feeds the denoiser, `predict` = the denoiser's output there, latents = the pipelines' own
normalisation, sigmas = the scheduler's). Wan trains on clip pairs (`clip_pairs_parquet`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import RECENT_PIPELINES, run_training
from xdpo.config import load_config
from xdpo.errors import ConfigError

CPU = torch.device("cpu")
IMAGE_SIDE, CLIP_SIDE, FRAMES = 16, 32, 5
FAMILIES = list(RECENT_PIPELINES)
IMAGES = [f for f in FAMILIES if f != "wan"]
LATENTS = {"qwenimage": (2, 4, 8, 8), "flux2": (2, 16, 4, 4), "flux2_klein": (2, 16, 4, 4)}
LATENTS |= {"zimage": (2, 4, 8, 8), "wan": (2, 4, 2, 8, 8)}
"""Training latents of two samples: z = 4 channels at 8 x 8 (FLUX.2: patchified 2x2), Wan's 5 frames -> 2."""


def fixture(family):
    return f"tiny_{family}_pipeline_dir"


def data_keys(family):
    """The tiny pipelines' training sizes: 16 px images, or 5-frame 32 px clips at 8 fps for Wan."""
    if family == "wan":
        return {"data.resolution": CLIP_SIDE, "data.num_frames": FRAMES, "data.fps": 8}
    return {"data.resolution": IMAGE_SIDE}


def data_path(request, family):
    return request.getfixturevalue("clip_pairs_parquet" if family == "wan" else "pairs_parquet")


def run(tmp_path, request, family, name="run", **overrides):
    base = request.getfixturevalue(fixture(family))
    keys = {"family.max_sequence_length": 32, **data_keys(family), **overrides}
    return run_training(tmp_path / name, base, data_path(request, family), **keys)


def cfg_of(path, family, *extra):
    over = [f"{k}={v}" for k, v in data_keys(family).items()]
    return load_config(None, [f"model.pretrained={path}", "data.path=x", *over, *extra])


def components(path, family, *extra):
    from xdpo.models.load import load_components

    cfg = cfg_of(path, family, *extra)
    return load_components(cfg.model, cfg.family)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pipeline_cls(family):
    import diffusers

    return getattr(diffusers, RECENT_PIPELINES[family])


def generate(pipe, family):
    """Two sampling steps at the tiny size give a finite, non-constant image (or a 5-frame clip)."""
    size = CLIP_SIDE if family == "wan" else IMAGE_SIDE
    kw = {"num_frames": FRAMES} if family == "wan" else {}
    out = pipe(
        prompt="a bright picture", num_inference_steps=2, height=size, width=size, output_type="np", **kw
    )
    arr = np.asarray(out.frames if family == "wan" else out.images)[0]
    assert arr.shape == ((FRAMES,) if family == "wan" else ()) + (size, size, 3)
    assert np.isfinite(arr).all() and float(arr.std()) > 0


# ---- detection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_read_from_model_index(request, family):
    from xdpo.models.load import check_pipeline

    path = request.getfixturevalue(fixture(family))
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == RECENT_PIPELINES[family]
    fam = check_pipeline(str(path))
    assert fam.name == family and fam.pipeline_class == RECENT_PIPELINES[family]
    assert fam.video == (family == "wan")


def test_a_two_expert_wan_is_refused_with_one_line(tmp_path, tiny_wan_pipeline_dir):
    from xdpo.models.load import check_pipeline

    folder = tmp_path / "wan22"
    folder.mkdir()
    for part in tiny_wan_pipeline_dir.iterdir():
        if part.is_dir():
            (folder / part.name).symlink_to(part, target_is_directory=True)
    index = json.loads((tiny_wan_pipeline_dir / "model_index.json").read_text())
    index |= {"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="two-expert Wan 2.2") as err:
        check_pipeline(str(folder))
    assert "\n" not in str(err.value)


def test_frames_are_checked_against_the_family_and_its_vae(tmp_path, request, tiny_wan_pipeline_dir):
    """Wan's VAE takes 4k + 1 frames; an image family takes none; both refused before any step."""
    with pytest.raises(
        ConfigError, match=r"`data.num_frames`: wan takes clips of 4k \+ 1 frames.*got 4; e\.g\. 1 or 5"
    ):
        run(tmp_path, request, "wan", **{"data.num_frames": 4})
    with pytest.raises(ConfigError, match="`data.num_frames`: qwenimage makes images"):
        run(tmp_path, request, "qwenimage", name="q", **{"data.num_frames": 5})


# ---- training end to end ---------------------------------------------------------------------------------


def _check_full_final(family, base, final):
    before = load_file(next((base / "transformer").glob("*.safetensors")))
    after = load_file(next((final / "transformer").glob("*.safetensors")))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    return pipeline_cls(family).from_pretrained(final)


def _check_lora_final(family, base, out):
    """base + load_lora_weights(final) reproduces the trained adapter (checkpoint step-3) in a forward."""
    from peft.utils import set_peft_model_state_dict

    from xdpo.models.load import add_lora

    comps = components(base, family)
    fam = comps.family
    trained = type(comps.denoiser).from_pretrained(base, subfolder="transformer")
    add_lora(trained, cfg_of(base, family, "model.lora_rank=4", "model.lora_alpha=8").model)
    adapter = load_file(out / "checkpoints" / "step-3" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    set_peft_model_state_dict(trained, adapter)
    pipe = pipeline_cls(family).from_pretrained(base)
    pipe.load_lora_weights(out / "final")
    cond = fam.encode_text(comps, ["a bright picture", "a dark picture"], CPU)
    shape = LATENTS[family]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        plain = fam.predict(comps.denoiser, x, t, cond)
        a = fam.predict(trained.eval(), x, t, cond)
        b = fam.predict(pipe.transformer, x, t, cond)
    assert (a - plain).abs().max() > 1e-5  # the adapter does something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return pipe


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_load_final(request, tmp_path, family, lora):
    base = request.getfixturevalue(fixture(family))
    kw = {"model.lora_rank": lora}
    if lora:
        kw.update({"model.lora_alpha": 8, "train.learning_rate": 1e-2})  # alpha != rank: scale 2 on loading
    out = run(tmp_path, request, family, **kw)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    info = json.loads((out / "final" / "xdpo.json").read_text())
    assert [info["family"], info["pipeline_class"], info["lora"]] == [
        family,
        RECENT_PIPELINES[family],
        bool(lora),
    ]
    pipe = _check_lora_final(family, base, out) if lora else _check_full_final(family, base, out / "final")
    generate(pipe, family)


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_batch_loss_falls(request, family, lora):
    """`train_step` + AdamW on one fixed batch and fixed (t, noise): the loss falls, accuracy 1."""
    from xdpo.data import open_data
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    base = request.getfixturevalue(fixture(family))
    keys = {**data_keys(family), "model.lora_rank": lora, "family.max_sequence_length": 32, "loss.beta": 1000}
    over = [f"{k}={v}" for k, v in keys.items()]
    cfg = load_config(None, [f"model.pretrained={base}", f"data.path={data_path(request, family)}", *over])
    m, models = single_process(cfg, CPU)
    _, data, _ = open_data(cfg)
    batch = data.collate([data[(i, 0)] for i in range(4)])
    opt = torch.optim.AdamW(models.params, lr=1e-2 if lora else 1e-3)
    history = []
    for _ in range(12):
        out = train_step(m, batch, torch.Generator().manual_seed(7)).out
        out.loss.mean().backward()
        opt.step()
        opt.zero_grad()
        history.append((out.loss.mean().item(), out.implicit_acc))
    assert history[0][0] == pytest.approx(np.log(2), abs=1e-4)
    assert history[-1][0] < 0.5 * history[0][0], history
    assert history[-1][1] == 1.0


@pytest.mark.parametrize("family", ["flux2", "zimage", "wan"])  # LoRA, full, full on clips
def test_resume_equals_uninterrupted_run(tmp_path, request, family):
    kw = {"model.lora_rank": 4 if family == "flux2" else 0, "data.flip": "pair", "data.prompt_dropout": 0.3}
    fresh = run(tmp_path, request, family, name="fresh", **{"train.max_steps": 4}, **kw)
    run(tmp_path, request, family, name="part", **{"train.max_steps": 2}, **kw)
    resumed = run(
        tmp_path, request, family, name="part", **{"train.max_steps": 4, "train.resume_from": "latest"}, **kw
    )
    a, b = read_metrics(fresh), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    untimed = [{k: v for k, v in r.items() if k != "step_time"} for r in a + b]
    assert untimed[:4] == untimed[4:]  # every metric of every step, exactly
    lora = kw["model.lora_rank"] > 0
    name = "checkpoints/step-4/adapter_model.safetensors" if lora else "final/transformer/"
    name += "" if lora else "diffusion_pytorch_model.safetensors"
    wa, wb = load_file(fresh / name), load_file(resumed / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
