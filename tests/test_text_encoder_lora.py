"""LoRA on the text encoders (`model.lora_text_encoder`): adapters on the family's CLIP encoders that receive
gradient through the step's encodings, their own optimizer group and lr, a reference on the base encoders,
exact resume, final/ and `xdpo export` (kohya `lora_te_` keys, merged weights), and the cache refusal."""

from __future__ import annotations

import pytest
import torch

from conftest import run_training
from xdpo.config import load_config
from xdpo.errors import ConfigError

TE_LR = 2e-2  # the text encoders' own lr in the runs below (the denoiser's: TRAIN_DEFAULTS' 1e-3)


def config(pipe, pairs, *overrides, resolution=32):
    return load_config(
        None,
        [f"model.pretrained={pipe}", f"data.path={pairs}", f"data.resolution={resolution}", "model.lora_rank=4",
         "model.lora_text_encoder=true", "loss.beta=1000", *overrides],
    )  # fmt: skip


def pair_batch(pairs, resolution=32):
    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table

    data = PreferencePairs(load_preference_table(str(pairs)), resolution=resolution)
    return collate_pairs([data[(i, 0)] for i in range(4)])


def base_conditions(pipe, captions, resolution=32):
    """The conditions of a freshly loaded base pipeline (no adapters anywhere), by the family's own encoder."""
    from xdpo.models.load import load_components

    cfg = load_config(None, [f"model.pretrained={pipe}", "data.path=x", f"data.resolution={resolution}"])
    comps = load_components(cfg.model, cfg.family)
    with torch.no_grad():
        return comps.family.encode_text(comps, captions, torch.device("cpu"))


def randomise_text_lora(encoders, seed=0, scale=0.3):
    """Every adapter weight of the text encoders drawn at random (B = 0 at init makes them no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for enc in encoders.values():
            for p in enc.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_text_encoder_adapters_receive_gradient_and_change_after_a_step(
    tiny_pipeline_dir, pairs_parquet, kind
):
    from xdpo.train.optim import make_optimizer
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    ctx, models = single_process(config(tiny_pipeline_dir, pairs_parquet, f"model.lora_type={kind}"))
    enc = models.comps.text_encoders["text_encoder"]
    assert list(models.comps.text_lora) == ["text_encoder"]
    trained = [n.split(".") for n, p in enc.named_parameters() if p.requires_grad]
    adapted = {part for parts in trained for part in parts if part.endswith("proj")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj"}  # CLIP attention (the family's trait)
    assert models.text_params and all(p.dtype == torch.float32 for p in models.text_params)
    batch = pair_batch(pairs_parquet)
    before = [p.detach().clone() for p in models.text_params]
    train_cfg = config(tiny_pipeline_dir, pairs_parquet).train
    opt = make_optimizer(train_cfg, models.params, 1e-3, ((models.text_params, 1e-2),))
    out = train_step(ctx, batch, torch.Generator().manual_seed(7)).out
    out.loss.mean().backward()
    grads = [p.grad for p in models.text_params]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    opt.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, models.text_params, strict=True)]
    assert any(changed)
    # the policy's encodings moved with the adapters, the base encodings (adapters off) stayed the base's
    from xdpo.data.encode import encode

    enc_after = encode(models.comps, batch, torch.Generator().manual_seed(7))
    base = base_conditions(tiny_pipeline_dir, batch.captions)["encoder_hidden_states"]
    base = torch.cat([base, base])  # [w; l]
    assert torch.equal(enc_after.reference_cond["encoder_hidden_states"], base)
    assert (enc_after.cond["encoder_hidden_states"] - base).abs().max() > 1e-6


def test_the_reference_conditions_on_the_base_text_encoder(tiny_pipeline_dir, pairs_parquet):
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    ctx, models = single_process(config(tiny_pipeline_dir, pairs_parquet))
    randomise_text_lora(models.comps.text_lora)
    seen = {}
    predict = ctx.reference.predict

    def spy(noisy, t, cond):
        seen["ref"] = {k: v.detach().clone() for k, v in cond.items()}
        return predict(noisy, t, cond)

    ctx.reference.predict = spy
    batch = pair_batch(pairs_parquet)
    train_step(ctx, batch, torch.Generator().manual_seed(3))
    base = base_conditions(tiny_pipeline_dir, batch.captions)["encoder_hidden_states"]
    assert torch.equal(seen["ref"]["encoder_hidden_states"], torch.cat([base, base]))
    # and the policy's conditions are the adapted encoder's (not the base's)
    from xdpo.data.encode import encode

    enc = encode(models.comps, batch, torch.Generator().manual_seed(3))
    assert (enc.cond["encoder_hidden_states"] - seen["ref"]["encoder_hidden_states"]).abs().max() > 1e-3


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_at_initialisation_the_policy_equals_the_reference(
    tmp_path, tiny_pipeline_dir, pairs_parquet, any_precision, quantize
):
    """B = 0: the adapted encoders are the base ones, so log z = 0 and the first loss is log 2 exactly (also
    on int8 encoders under bf16, whose bitsandbytes layers would differ between train and eval mode)."""
    import json

    out = run_training(
        tmp_path / quantize, tiny_pipeline_dir, pairs_parquet,
        **{**RUN, "train.max_steps": 1, "train.mixed_precision": "bf16", "model.quantize_text_encoders": quantize},
    )  # fmt: skip
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-6)


def test_sdxl_trains_lora_on_both_clip_encoders(tiny_sdxl_pipeline_dir, pairs_parquet):
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    ctx, models = single_process(config(tiny_sdxl_pipeline_dir, pairs_parquet, resolution=16))
    assert sorted(models.comps.text_lora) == ["text_encoder", "text_encoder_2"]
    out = train_step(ctx, pair_batch(pairs_parquet, 16), torch.Generator().manual_seed(1)).out
    out.loss.mean().backward()
    for name, enc in models.comps.text_lora.items():
        grads = {n: p.grad for n, p in enc.named_parameters() if p.requires_grad}
        last = {
            n: int(n.split("layers.")[1].split(".")[0]) == enc.config.num_hidden_layers - 1 for n in grads
        }
        # SDXL reads both encoders' penultimate states, and CLIP-G's pooled output (its last layer too)
        assert all((g is None) == (last[n] and name == "text_encoder") for n, g in grads.items()), name
        assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0, name


def test_text_encoder_lr_is_scaled_as_the_learning_rate():
    from xdpo.train.optim import learning_rate, text_encoder_lr

    cfg = load_config(None, ["data.path=x", "model.pretrained=x", "model.lora_rank=4", "model.lora_text_encoder=true",
                             "model.lora_text_encoder_lr=3e-5", "train.learning_rate=1e-6", "train.batch_size=2",
                             "train.grad_accum=3"])  # fmt: skip
    assert text_encoder_lr(cfg, 4) == pytest.approx(3e-5 * 2 * 3 * 4)
    assert learning_rate(cfg.train, 4) == pytest.approx(1e-6 * 2 * 3 * 4)
    cfg.model.lora_text_encoder_lr = None  # empty: the denoiser's
    assert text_encoder_lr(cfg, 4) == pytest.approx(learning_rate(cfg.train, 4))


RUN = {"model.lora_rank": 4, "model.lora_alpha": 8, "model.lora_text_encoder": "true", "model.lora_text_encoder_lr": TE_LR,
       "train.max_steps": 4}  # fmt: skip


@pytest.fixture(scope="module")
def te_run(tmp_path_factory, tiny_pipeline_dir, pairs_parquet):
    """A 4-step LoRA run with text-encoder LoRA (checkpoints at steps 2 and 4)."""
    return run_training(
        tmp_path_factory.mktemp("te") / "fresh", tiny_pipeline_dir, pairs_parquet,
        **{**RUN, "train.checkpoint_every": 2},
    )  # fmt: skip


def test_the_optimizer_has_the_text_encoder_group_at_its_own_lr(te_run):
    from safetensors.torch import load_file

    state = torch.load(te_run / "checkpoints" / "step-4" / "optimizer.bin", weights_only=False)
    groups = state["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(TE_LR)]
    saved = load_file(str(te_run / "checkpoints" / "step-4" / "text_encoder_adapters.safetensors"))
    assert len(groups[1]["params"]) == len(saved) == 16  # A and B of q, k, v, out in 2 CLIP layers
    assert all(k.startswith("text_encoder.") for k in saved)


def test_checkpoint_and_resume_restore_the_text_encoder_lora_exactly(
    te_run, tmp_path, tiny_pipeline_dir, pairs_parquet
):
    from safetensors.torch import load_file

    part = tmp_path / "part"
    run_training(
        part, tiny_pipeline_dir, pairs_parquet, **{**RUN, "train.max_steps": 2, "train.checkpoint_every": 2}
    )
    run_training(part, tiny_pipeline_dir, pairs_parquet, **{**RUN, "train.resume_from": "latest"})
    name = "pytorch_lora_weights.safetensors"
    fresh, resumed = load_file(te_run / "final" / name), load_file(part / "final" / name)
    text_keys = [k for k in fresh if k.startswith("text_encoder.")]
    assert text_keys and fresh.keys() == resumed.keys()
    assert all(torch.equal(fresh[k], resumed[k]) for k in fresh)
    ck = "checkpoints/step-4/text_encoder_adapters.safetensors"
    a, b = load_file(te_run / ck), load_file(part / ck)
    assert all(torch.equal(a[k], b[k]) for k in a)
    step2 = load_file(te_run / "checkpoints/step-2/text_encoder_adapters.safetensors")
    assert any(not torch.equal(step2[k], a[k]) for k in a)  # they trained between the checkpoints


def text_output(pipe, prompt="a bright picture"):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_final_and_export_carry_the_text_encoder_lora(te_run, tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from xdpo.export.cli import export

    def pipe():
        return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)

    out = export(te_run, tmp_path / "export", say=lambda *_: None)
    kohya = load_file(out / "fresh_kohya.safetensors")
    te = [k for k in kohya if k.startswith("lora_te_")]
    assert te and any(k.startswith("lora_unet_") for k in kohya)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    base = text_output(pipe())
    with_final = pipe()
    with_final.load_lora_weights(te_run / "final")
    tuned = text_output(with_final)
    assert (tuned - base).abs().max() > 1e-5  # final/'s file holds the trained text-encoder LoRA
    with_kohya = pipe()
    with_kohya.load_lora_weights(out, weight_name="fresh_kohya.safetensors")
    torch.testing.assert_close(text_output(with_kohya), tuned, rtol=1e-5, atol=1e-6)
    merged = StableDiffusionPipeline.from_pretrained(out / "merged", safety_checker=None)

    def q_proj(p):
        return next(
            w for n, w in p.text_encoder.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight")
        )

    base_q, merged_q = q_proj(pipe()), q_proj(merged)
    assert not torch.equal(base_q, merged_q)  # the text encoder's LoRA was fused in
    torch.testing.assert_close(text_output(merged), tuned, rtol=1e-5, atol=1e-6)


def test_loha_final_puts_the_text_encoder_adapter_back(tmp_path, tiny_pipeline_dir, pairs_parquet):
    from safetensors.torch import load_file

    from xdpo.evaluate.pipeline import load_pipeline
    from xdpo.models.load import load_components
    from xdpo.models.lora import add_text_lora, load_text_adapter_state

    out = run_training(tmp_path / "loha", tiny_pipeline_dir, pairs_parquet,
                       **{**RUN, "model.lora_type": "loha", "train.max_steps": 2})  # fmt: skip
    assert (out / "final" / "text_encoder" / "adapter_model.safetensors").is_file()
    pipe = load_pipeline(tiny_pipeline_dir, lora=out / "final", device="cpu", dtype="fp32")
    cfg = load_config(out / "config.yaml")
    comps = load_components(cfg.model, cfg.family)
    encoders = add_text_lora(comps.family, comps.text_encoders, cfg.model)
    saved = load_file(out / "checkpoints" / "step-2" / "text_encoder_adapters.safetensors")
    load_text_adapter_state(encoders, saved, "test")
    encoders["text_encoder"].eval()
    expected = text_output(comps.pipe)
    torch.testing.assert_close(text_output(pipe), expected)
    base = base_conditions(tiny_pipeline_dir, ["a bright picture"])["encoder_hidden_states"]
    assert (expected - base).abs().max() > 0  # the trained adapter changes the encoder


@pytest.mark.parametrize(
    ("overrides", "key"),
    [(["data.cache=somewhere"], "data.cache"),
     (["model.lora_rank=0"], "model.lora_text_encoder"),
     (["reference.strategy=stable"], "reference.strategy")],
)  # fmt: skip
def test_refusals_are_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.path=x", "model.pretrained=x", "model.lora_rank=4", "model.lora_text_encoder=true",
                           *overrides])  # fmt: skip
    assert f"`{key}`" in str(e.value) and "\n" not in str(e.value)
    if key == "data.cache":
        assert "model.lora_text_encoder" in str(e.value) and "each step" in str(e.value)


def test_a_family_without_text_encoder_lora_is_refused_and_the_lr_needs_the_switch():
    from types import SimpleNamespace

    from xdpo.models.lora import add_text_lora

    fam = SimpleNamespace(name="wan", text_lora=())
    with pytest.raises(ConfigError, match="wan declares no text encoder that trains LoRA"):
        add_text_lora(fam, {"text_encoder": torch.nn.Linear(2, 2)}, None)
    with pytest.raises(ConfigError, match="model.lora_text_encoder_lr"):
        load_config(
            None,
            ["data.path=x", "model.pretrained=x", "model.lora_rank=4", "model.lora_text_encoder_lr=1e-4"],
        )


def test_resuming_with_another_text_encoder_setting_is_refused(tmp_path):
    from xdpo.errors import XdpoError
    from xdpo.train.state import TrainerState

    st = TrainerState(
        setup={"world": 1, "batch_size": 2, "grad_accum": 1, "lora_rank": 4, "lora_text_encoder": True}
    )
    with pytest.raises(XdpoError, match="model.lora_text_encoder=true"):
        st.check_setup({"world": 1, "batch_size": 2, "grad_accum": 1, "lora_rank": 4}, tmp_path, print)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor"])
def test_every_optimizer_takes_the_text_encoder_group(optimizer):
    from xdpo.train.optim import make_optimizer

    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    cfg = load_config(None, ["data.path=x", "model.pretrained=x", f"train.optimizer={optimizer}"])
    den, te = [torch.nn.Parameter(torch.ones(64, 64))], [torch.nn.Parameter(torch.ones(64, 64))]
    opt = make_optimizer(cfg.train, den, 1e-3, ((te, 5e-2),))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-2]
    assert opt.param_groups[1]["params"][0] is te[0]
    for p in den + te:
        p.grad = torch.ones_like(p)
    opt.step()
    moved = [float((1 - p.detach()).abs().mean()) for p in den + te]
    assert moved[1] > 10 * moved[0] > 0  # each group at its own lr


@pytest.mark.parametrize("fixture", ["tiny_sd3_pipeline_dir", "tiny_flux_pipeline_dir"])
def test_flow_families_save_their_clip_lora_and_flux_exports_lora_te1(
    request, tmp_path, pairs_parquet, fixture
):
    """SD3 (CLIP-L, CLIP-G) and Flux (CLIP): final/ loads back with its text-encoder LoRA in diffusers; Flux's
    kohya file names it `lora_te1_` and loads to the same encoder."""
    import diffusers
    from safetensors.torch import load_file

    from xdpo.export.cli import export

    pipe_dir = request.getfixturevalue(fixture)
    out = run_training(tmp_path / "run", pipe_dir, pairs_parquet,
                       **{**RUN, "data.resolution": 16, "train.max_steps": 2})  # fmt: skip

    def clip_output(lora=None, **kw):
        pipe = diffusers.DiffusionPipeline.from_pretrained(pipe_dir)
        if lora is not None:
            pipe.load_lora_weights(lora, **kw)
        ids = pipe.tokenizer(["a bright picture"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]

    tuned = clip_output(out / "final")
    assert (tuned - clip_output()).abs().max() > 1e-5
    if fixture == "tiny_flux_pipeline_dir":
        exported = export(out, tmp_path / "export", formats=("kohya",), say=lambda *_: None)
        kohya = load_file(exported / "run_kohya.safetensors")
        assert any(k.startswith("lora_te1_text_model_") for k in kohya)
        assert any(k.startswith("lora_transformer_") for k in kohya)
        torch.testing.assert_close(clip_output(exported, weight_name="run_kohya.safetensors"), tuned)
