"""Reference strategies (frozen, periodic, ema) for full fine-tuning and LoRA, and resume of a periodic run."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from conftest import run_training
from xdpo.config import ReferenceConfig, load_config
from xdpo.models.families import get_family
from xdpo.models.load import add_lora
from xdpo.train.reference import Probe, Reference

CPU = torch.device("cpu")
SD = get_family("sd")


@pytest.fixture
def unet(tiny_pipeline_dir):
    return UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")


def inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), cond


def perturb(unet, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def policy_out(unet, x, t, c):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def ref_out(ref, unet, x, t, c):
    with torch.inference_mode():
        return ref.predict(x, t, {"encoder_hidden_states": c}).clone()


def make(unet, lora, **kw):
    if lora:
        add_lora(unet, load_config(None, ["model.pretrained=x", "data.path=y", "model.lora_rank=4"]).model)
    return Reference(ReferenceConfig(**kw), SD, unet, lora=lora, dtype=torch.float32, device=CPU)


def update(ref, step, d=0.0):
    """`maybe_update` with the probe-set estimate replaced by a fixed D (the decision logic alone)."""
    ref.estimate = lambda *args: (d, 0.01)
    return ref.maybe_update(step, seed=0)


@pytest.mark.parametrize("lora", [False, True])
def test_periodic_copies_policy_every_tau_steps_only(unet, lora):
    ref = make(unet, lora, strategy="periodic", update_every=2, max_divergence=1.0)
    x, t, c = inputs(unet)
    initial = policy_out(unet, x, t, c)
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), initial)
    perturb(unet, seed=1)
    assert update(ref, 1, 0.0) is None  # not a check step
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), initial)
    assert update(ref, 2, 0.5) == 0.5  # within delta: update
    after_first = policy_out(unet, x, t, c)
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), after_first)
    assert not torch.allclose(after_first, initial)
    perturb(unet, seed=2)
    update(ref, 3, 0.0)
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), after_first)  # unchanged between updates
    assert ref.strategy.updates == 1 and ref.strategy.frozen_step is None


@pytest.mark.parametrize("lora", [False, True])
def test_exceeding_delta_freezes_for_good(unet, lora):
    ref = make(unet, lora, strategy="periodic", update_every=1, max_divergence=1e-6)
    x, t, c = inputs(unet)
    initial = policy_out(unet, x, t, c)
    perturb(unet)
    assert update(ref, 1, 1.0) == 1.0
    assert ref.strategy.frozen_step == 1
    for step in range(2, 5):
        perturb(unet, seed=step)
        assert update(ref, step, 0.0) is None  # no more checks once frozen
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), initial)
    assert ref.strategy.updates == 0


@pytest.mark.parametrize("lora", [False, True])
def test_reinit_restores_the_initial_model(unet, lora):
    ref = make(unet, lora, strategy="periodic", update_every=1, max_divergence=0.1, on_exceed="reinit")
    x, t, c = inputs(unet)
    initial = policy_out(unet, x, t, c)
    perturb(unet)
    update(ref, 1, 0.0)
    assert not torch.allclose(ref_out(ref, unet, x, t, c), initial)
    perturb(unet, seed=3)
    update(ref, 2, 5.0)
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), initial)
    assert ref.strategy.frozen_step is None  # reinit keeps checking


def test_lora_ema_is_refused_with_one_line():
    from xdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="reference.strategy.*not an average of the weights"):
        load_config(
            None, ["model.pretrained=x", "data.path=y", "model.lora_rank=4", "reference.strategy=ema"]
        )


@pytest.mark.parametrize("lora", [False])
def test_ema_blends(unet, lora):
    ref = make(unet, lora, strategy="ema", update_every=1, ema_decay=0.75)
    params0 = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    perturb(unet)
    update(ref, 1, 0.0)
    current = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    saved = ref.tensors()
    name = next(n for n in current if (not lora) or "lora_B" in n)
    expected = 0.75 * params0[name] + 0.25 * current[name]
    torch.testing.assert_close(saved[name], expected)


@pytest.mark.parametrize("lora", [False, True])
def test_state_round_trip(unet, lora):
    ref = make(unet, lora, strategy="periodic", update_every=1, max_divergence=1.0)
    perturb(unet)
    update(ref, 1, 0.2)
    x, t, c = inputs(unet)
    before = ref_out(ref, unet, x, t, c)
    state, tensors = ref.state(), ref.tensors()
    perturb(unet, seed=5)
    other = Reference(ref.cfg, SD, unet, lora=lora, dtype=torch.float32, device=CPU)
    other.load(state, tensors)
    torch.testing.assert_close(ref_out(other, unet, x, t, c), before)
    assert other.strategy.updates == 1 and other.strategy.last_divergence == pytest.approx(0.2)


def test_divergence_estimate_is_zero_for_the_same_model_and_grows_with_drift(unet, tiny_pipeline_dir):
    from xdpo.models.load import load_components
    from xdpo.models.noise import DDPMProcess

    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=y"])
    comps = load_components(cfg.model, cfg.family)
    ref = make(unet, False, strategy="periodic")
    lat = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))}
    probe = Probe(lat, cond, DDPMProcess(comps.scheduler), autocast=torch.no_grad)

    def d(est):
        gen = torch.Generator().manual_seed(2)
        return probe.divergence(ref.policy_predict, ref.initial_predict, lat, cond, gen, est)

    assert d("pred_mse").abs().max().item() == 0.0
    perturb(unet, 0.01)
    small = d("pred_mse").mean().item()
    perturb(unet, 0.05, seed=9)
    assert d("pred_mse").mean().item() > small > 0
    assert d("error_gap").shape == (3,)


PERIODIC = {
    "reference.strategy": "periodic",
    "reference.update_every": 2,
    "reference.max_divergence": 1.0,
    "timesteps.sampling": "skewed",
    "timesteps.weighting": "snr",
}


def run(tmp_path, pipe, pairs, name, **overrides):
    """The shared harness (conftest.run_training) with a periodic reference and skewed, SNR-weighted t."""
    return run_training(tmp_path / name, pipe, pairs, **{**PERIODIC, **overrides})


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [0, 4])
def test_periodic_run_resumes_exactly(tmp_path, tiny_pipeline_dir, pairs_parquet, lora):
    """Resume in the middle of a periodic run (after one reference update) reproduces the uninterrupted run."""
    kw = {"model.lora_rank": lora}
    fresh = run(tmp_path, tiny_pipeline_dir, pairs_parquet, "fresh", **{"train.max_steps": 5}, **kw)
    run(tmp_path, tiny_pipeline_dir, pairs_parquet, "part", **{"train.max_steps": 3}, **kw)
    resumed = run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        "part",
        **{"train.max_steps": 5, "train.resume_from": "latest"},
        **kw,
    )
    a, b = metrics(fresh), metrics(resumed)
    assert [r["ref_updates"] for r in a] == [0, 1, 1, 2, 2]
    assert [r["ref_divergence"] is not None for r in a] == [False, True, False, True, False]
    assert all(1.0 <= r["lambda_mean"] <= 2.0 for r in a)
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["ref_divergence"] == rb["ref_divergence"]
        assert ra["ref_updates"] == rb["ref_updates"]
    if lora:
        wa = load_file(fresh / "final" / "pytorch_lora_weights.safetensors")
        wb = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    else:
        wa = UNet2DConditionModel.from_pretrained(fresh / "final", subfolder="unet").state_dict()
        wb = UNet2DConditionModel.from_pretrained(resumed / "final", subfolder="unet").state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra = load_file(fresh / "checkpoints" / "step-5" / "reference.safetensors")
    rb = load_file(resumed / "checkpoints" / "step-5" / "reference.safetensors")
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


def test_tiny_delta_freezes_at_first_check_in_a_run(tmp_path, tiny_pipeline_dir, pairs_parquet):
    out = run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        "frozen",
        **{"train.max_steps": 4, "reference.max_divergence": 1e-12, "loss.objective": "kto"},
    )
    rows = metrics(out)
    assert [r["ref_frozen_step"] for r in rows] == [None, 2, 2, 2]
    assert rows[-1]["ref_updates"] == 0
    state = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["reference"]["frozen_step"] == 2


def test_lora_adapters_disabled_is_the_base_model(tiny_pipeline_dir):
    """The cheap switch (the tuner layers' flag) gives exactly the base UNet, and restores the adapters."""
    from xdpo.models.load import adapters_disabled

    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    lora = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    make(lora, True)
    perturb(lora, seed=3)  # non-zero adapters
    x, t, c = inputs(base)
    with_adapters = policy_out(lora, x, t, c)
    with adapters_disabled(lora):
        torch.testing.assert_close(policy_out(lora, x, t, c), policy_out(base, x, t, c))
    torch.testing.assert_close(policy_out(lora, x, t, c), with_adapters)
    assert not torch.allclose(with_adapters, policy_out(base, x, t, c))
