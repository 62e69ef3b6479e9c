"""End-to-end training on the tiny pipeline: outputs, learning, resume, loading the result."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import run_training, torchrun
from xdpo.config import load_config

REQUIRED_METRICS = {
    "step",
    "loss",
    "implicit_acc",
    "reward_margin",
    "reward_w",
    "reward_l",
    "lr",
    "grad_norm",
    "clamp_fraction",
    "pairs_seen",
}


def run(tmp_path, pipe, pairs, name="run", **overrides):
    """The shared harness (conftest.run_training), checkpointing every 2 steps."""
    return run_training(tmp_path / name, pipe, pairs, **{"train.checkpoint_every": 2, **overrides})


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unet_weights(path):
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet").state_dict()


def test_full_finetune_writes_outputs_and_changes_weights(tmp_path, tiny_pipeline_dir, pairs_parquet):
    out = run(tmp_path, tiny_pipeline_dir, pairs_parquet, **{"train.checkpoints_keep": 1})
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= REQUIRED_METRICS
    assert rows[-1]["pairs_seen"] == 6
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]  # pruned to keep=1
    before, after = unet_weights(tiny_pipeline_dir), unet_weights(out / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pipe = StableDiffusionPipeline.from_pretrained(out / "final", safety_checker=None)
    image = pipe("a bright picture", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0


def test_lora_writes_adapter_that_diffusers_loads(tmp_path, tiny_pipeline_dir, pairs_parquet):
    out = run(tmp_path, tiny_pipeline_dir, pairs_parquet, **{"model.lora_rank": 4, "loss.divergence": "xdpo"})
    weights = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert weights and any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k or "up" in k)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    gen = torch.Generator().manual_seed(0)
    plain = pipe("a bright picture", num_inference_steps=2, output_type="np", generator=gen).images[0]
    pipe.load_lora_weights(out / "final")
    gen = torch.Generator().manual_seed(0)
    tuned = pipe("a bright picture", num_inference_steps=2, output_type="np", generator=gen).images[0]
    assert abs(plain - tuned).max() > 0
    assert json.loads((out / "final" / "xdpo.json").read_text())["lora"] is True


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("divergence", ["reverse_kl", "xdpo"])
def test_fixed_batch_loss_falls_and_accuracy_rises(tiny_pipeline_dir, pairs_parquet, lora, divergence):
    """The loop's own step (`train_step` + AdamW) on one fixed batch and fixed (t, noise)."""
    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    cfg = load_config(
        None,
        [
            f"model.pretrained={tiny_pipeline_dir}",
            f"data.path={pairs_parquet}",
            f"model.lora_rank={lora}",
            f"loss.divergence={divergence}",
            "loss.beta=1000",
        ],
    )
    m, models = single_process(cfg)
    params = models.params
    pairs = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=32)
    batch = collate_pairs([pairs[(i, 0)] for i in range(4)])
    opt = torch.optim.AdamW(params, lr=1e-3 if lora else 1e-4)
    history = []
    for _ in range(12):
        gen = torch.Generator().manual_seed(7)  # the same t and noise every step
        out = train_step(m, batch, gen).out
        out.loss.mean().backward()
        opt.step()
        opt.zero_grad()
        history.append((out.loss.mean().item(), out.implicit_acc))
    assert history[0] == (pytest.approx(0.693147, abs=1e-5), 0.5)  # policy == reference at the start
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] == 1.0


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_equals_uninterrupted_run(tmp_path, tiny_pipeline_dir, pairs_parquet, lora, capsys):
    kw = {
        "model.lora_rank": lora,
        "train.checkpoint_every": 0,
        "data.flip": "pair",
        "data.prompt_dropout": 0.3,
    }
    fresh = run(tmp_path, tiny_pipeline_dir, pairs_parquet, name="fresh", **{"train.max_steps": 6}, **kw)
    part = run(tmp_path, tiny_pipeline_dir, pairs_parquet, name="part", **{"train.max_steps": 3}, **kw)
    assert (
        "; pair/reverse_kl/sigmoid beta=100 (schedule constant); reference frozen;" in capsys.readouterr().out
    )
    resumed = run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        name="part",
        **{"train.max_steps": 6, "train.resume_from": "latest"},
        **kw,
    )
    assert "Resuming from" in capsys.readouterr().out
    assert resumed == part
    # a second resume continues from the real step (trainer_state.json records it, not the first resume's)
    run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        name="part",
        **{"train.max_steps": 7, "train.resume_from": "latest"},
        **kw,
    )
    assert "at step 6" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6, 7]
    a = read_metrics(fresh)
    b = read_metrics(resumed)[:6]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]
    if lora:
        wa = load_file(fresh / "checkpoints" / "step-6" / "adapter_model.safetensors")
        wb = load_file(resumed / "checkpoints" / "step-6" / "adapter_model.safetensors")
    else:
        wa, wb = (
            unet_weights(fresh / "checkpoints" / "step-6"),
            unet_weights(resumed / "checkpoints" / "step-6"),
        )
    assert wa.keys() == wb.keys()
    for k in wa:  # exact on CPU: all randomness is derived from (seed, step)
        assert torch.equal(wa[k], wb[k]), k


def test_v_prediction_pipeline_trains(tmp_path, tiny_pipeline_v_dir, pairs_parquet):
    out = run(tmp_path, tiny_pipeline_v_dir, pairs_parquet, **{"train.max_steps": 2, "loss.objective": "sft"})
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_refuses_to_overwrite_a_run(tmp_path, tiny_pipeline_dir, pairs_parquet):
    from xdpo.errors import XdpoError

    run(tmp_path, tiny_pipeline_dir, pairs_parquet, **{"train.max_steps": 1})
    with pytest.raises(XdpoError, match="resume_from=latest"):
        run(tmp_path, tiny_pipeline_dir, pairs_parquet, **{"train.max_steps": 2})


def test_interrupted_run_keeps_its_progress(tmp_path, tiny_pipeline_dir, pairs_parquet, monkeypatch):
    """Ctrl-C in step 3 of a run without periodic checkpoints: steps 1-2 are saved and resumable."""
    import xdpo.train.recipe as loop

    real, calls = loop.train_step, {"n": 0}

    def interrupt_on_third_call(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", interrupt_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_pipeline_dir, pairs_parquet, **{"train.max_steps": 5, "train.checkpoint_every": 0})
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.setattr(loop, "train_step", real)
    run(tmp_path, tiny_pipeline_dir, pairs_parquet, **{"train.max_steps": 5, "train.resume_from": "latest"})
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """DDP over gloo on CPU: 2 processes, the effective batch doubles, one metrics line per step, resumable."""

    def launch(steps, *extra):
        return torchrun(
            "train", f"model.pretrained={tiny_pipeline_dir}", f"data.path={pairs_parquet}", "data.resolution=32",
            f"output_dir={tmp_path / 'ddp'}", f"train.max_steps={steps}", "train.batch_size=2", "model.lora_rank=4",
            "train.learning_rate=1e-3", "train.scale_lr=false", "train.warmup_steps=0", "train.checkpoint_every=0",
            *extra,
        )  # fmt: skip

    first = launch(2)
    assert "effective batch 4 pairs" in first
    launch(3, "train.resume_from=latest")
    rows = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["pairs_seen"] == 12
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-3"
    assert (ckpt / "random_states_1.pkl").is_file()
    assert (tmp_path / "ddp" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_lora_alpha_survives_the_final_save(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """lora_alpha != rank: the weights diffusers loads from final/ reproduce the trained adapter."""
    from peft.utils import set_peft_model_state_dict

    from xdpo.models.load import add_lora

    out = run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        **{"model.lora_rank": 4, "model.lora_alpha": 16, "train.max_steps": 2, "train.learning_rate": 1e-2},
    )
    trained = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    add_lora(
        trained,
        load_config(
            None, ["model.pretrained=x", "data.path=y", "model.lora_rank=4", "model.lora_alpha=16"]
        ).model,
    )
    set_peft_model_state_dict(
        trained, load_file(out / "checkpoints" / "step-2" / "adapter_model.safetensors")
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_lora_weights(out / "final")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = trained(x, torch.tensor([500]), encoder_hidden_states=cond).sample
        b = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample
        plain = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")(
            x, torch.tensor([500]), encoder_hidden_states=cond
        ).sample
    assert (a - plain).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_half_precision_reference_next_to_fp32_policy(tmp_path, tiny_pipeline_dir, pairs_parquet):
    out = run(
        tmp_path, tiny_pipeline_dir, pairs_parquet, **{"model.reference_dtype": "bf16", "train.max_steps": 1}
    )
    # the reference is the initial model in bf16: near log 2 up to bf16 rounding of its errors (x beta/2 = 50)
    assert 0.55 < read_metrics(out)[0]["loss"] < 0.85


def test_dry_run_validates_and_writes_nothing(tmp_path, tiny_pipeline_dir, pairs_parquet, capsys):
    from xdpo.cli import main

    out = tmp_path / "never"
    args = [f"model.pretrained={tiny_pipeline_dir}", f"data.path={pairs_parquet}", f"output_dir={out}"]
    assert main(["train", "--dry-run", *args, "model.lora_rank=4", "train.optimizer=adafactor"]) == 0
    text = capsys.readouterr().out
    assert "usable pairs" in text and "Memory estimate" in text and "lora_rank: 4" in text
    assert not out.exists()


def test_memory_estimate_counts_adapters_and_the_full_optimizer(tiny_pipeline_dir):
    from xdpo.models.families import get_family
    from xdpo.train.memory import estimate, meta_modules

    base = [f"model.pretrained={tiny_pipeline_dir}", "data.path=x"]
    fam = get_family("sd")
    full_cfg = load_config(None, base)
    mods = meta_modules(str(tiny_pipeline_dir), fam, full_cfg)
    full = estimate(mods, "unet", full_cfg)
    p = sum(x.numel() for x in mods["unet"].parameters())
    assert full["_trainable"] == p and full["optimizer state"] == 8 * p and full["gradients"] == 4 * p
    lora = estimate(mods, "unet", load_config(None, [*base, "model.lora_rank=4"]))
    assert 0 < lora["_trainable"] < p / 10 and lora["reference"] == 0
    # the count matches what peft attaches
    from xdpo.models.load import add_lora, load_components

    lora_cfg = load_config(None, [*base, "model.lora_rank=4"])
    comps = load_components(lora_cfg.model, lora_cfg.family)
    add_lora(comps.denoiser, load_config(None, [*base, "model.lora_rank=4"]).model)
    attached = sum(x.numel() for x in comps.denoiser.parameters() if x.requires_grad)
    assert lora["_trainable"] == attached


def test_memory_estimate_divides_what_each_sharding_shards(tiny_pipeline_dir):
    """FSDP2 / ZeRO-3 divide weights, gradients and optimizer state by the processes, ZeRO-2 the last two,
    ZeRO-1 the optimizer; DeepSpeed in bf16 keeps a bf16 model and fp32 masters in its optimizer shards."""
    from xdpo.models.families import get_family
    from xdpo.train.memory import estimate, format_estimate, meta_modules

    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=x"])
    mods = meta_modules(str(tiny_pipeline_dir), get_family("sd"), cfg)
    one = estimate(mods, "unet", cfg)
    p = one["_params"]
    fsdp, zero2 = (estimate(mods, "unet", cfg, (mode, 4)) for mode in ("fsdp", "zero2"))
    assert fsdp["denoiser weights"] == one["denoiser weights"] / 4 and fsdp["optimizer state"] == 2 * p
    assert (
        zero2["denoiser weights"] == 4 * p
        and zero2["gradients"] == p
        and zero2["reference"] == one["reference"]
    )
    assert estimate(mods, "unet", cfg, ("zero1", 4))["gradients"] == 4 * p
    cfg.train.mixed_precision = "bf16"
    z3 = estimate(mods, "unet", cfg, ("zero3", 4))
    assert z3["denoiser weights"] == 2 * p / 4 and z3["optimizer state"] == (8 + 4) * p / 4
    assert "sharded: zero3 over 4 processes" in format_estimate(z3)


def test_adamw8bit_steps(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """8-bit AdamW (bitsandbytes) trains: large tensors get uint8 moments, and a run's weights move."""
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as e:  # pragma: no cover - where bitsandbytes cannot be installed
        pytest.skip(f"bitsandbytes cannot run here: {e}")
    from xdpo.train.optim import make_optimizer

    cfg = load_config(None, ["model.pretrained=x", "data.path=y", "train.optimizer=adamw8bit"])
    p = torch.nn.Parameter(torch.randn(128, 64))
    opt = make_optimizer(cfg.train, [p], 1e-2)
    p.pow(2).sum().backward()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8  # 1 byte per value, vs 4 for AdamW
    out = run(
        tmp_path, tiny_pipeline_dir, pairs_parquet, **{"train.max_steps": 2, "train.optimizer": "adamw8bit"}
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["grad_norm"] > 0
    before = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").state_dict()
    after = unet_weights(out / "checkpoints" / "step-2")
    assert any(not torch.equal(before[k], after[k]) for k in before)
