"""Reference strategies (frozen, stable, periodic, ema) for full fine-tuning and LoRA, the guard's divergence
estimators, and exact resume of runs whose reference moves."""

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
    """`maybe_update` with the probe-set estimates replaced by a fixed D (the decision logic alone)."""
    ref.estimate = lambda *args, **kw: (d, 0.01)
    ref.distances = lambda *args, **kw: {"initial": 0.25, "policy": 0.5}
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


def trainable(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("alpha,kappa", [(0.5, 0.0), (1.0, 0.3), (0.25, 0.2)])
def test_stable_moves_by_alpha_toward_the_policy_then_kappa_toward_the_initial_model(unet, alpha, kappa):
    """Full fine-tune, two updates: ref <- (1 - alpha) ref + alpha policy, then ref <- ref + kappa (init - ref)."""
    init = trainable(unet)
    ref = make(unet, False, strategy="stable", update_every=1, alpha=alpha, anchor=kappa, max_divergence=1.0)
    assert next(ref.storage.ref_model.parameters()).dtype == torch.float32
    expected = dict(init)
    for step in (1, 2):
        perturb(unet, seed=step)
        policy = trainable(unet)
        assert update(ref, step, 0.5) == 0.5
        for k in init:
            expected[k] = (1 - kappa) * ((1 - alpha) * expected[k] + alpha * policy[k]) + kappa * init[k]
    saved = ref.tensors()
    for k in init:
        torch.testing.assert_close(saved[k], expected[k], rtol=0, atol=1e-6)
    assert ref.strategy.updates == 2 and ref.metrics(None)["ref_to_policy"] == 0.5
    assert ref.metrics(None)["ref_to_policy"] is None  # logged once, at the step that measured it


def test_stable_lora_copies_the_adapters_and_the_anchor_scales_b(unet):
    """LoRA (alpha = 1): the reference is the policy's adapters with B scaled by 1 - kappa, i.e. the weights
    W + (1 - kappa) s B A: exactly kappa of the way back to the initial model (B A = 0)."""
    kappa = 0.3
    ref = make(unet, True, strategy="stable", update_every=1, anchor=kappa, max_divergence=1.0)
    x, t, c = inputs(unet)
    for step in (1, 2):
        perturb(unet, seed=step)
        policy = trainable(unet)
        update(ref, step, 0.0)
        for k, v in ref.tensors().items():
            torch.testing.assert_close(v, (1 - kappa) * policy[k] if ".lora_B." in k else policy[k])
    with torch.no_grad():  # the expected reference: the policy's B factors scaled by 1 - kappa
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.mul_(1 - kappa)
    torch.testing.assert_close(ref_out(ref, unet, x, t, c), policy_out(unet, x, t, c))


@pytest.mark.parametrize("on_exceed", ["freeze", "reinit"])
def test_stable_refused_candidate_keeps_the_last_reference_within_delta(unet, on_exceed):
    """alpha < 1: the staged candidate is checked; past delta the previous reference is restored and frozen
    (distances still measured every tau), or the reference resets to the initial model."""
    init = trainable(unet)
    ref = make(
        unet, False, strategy="stable", update_every=1, alpha=0.5, max_divergence=0.1, on_exceed=on_exceed
    )
    perturb(unet, seed=1)
    update(ref, 1, 0.05)
    kept = ref.tensors()
    assert any(not torch.equal(kept[k], init[k]) for k in init)
    perturb(unet, seed=2)
    assert update(ref, 2, 5.0) == 5.0
    after = ref.tensors()
    for k in init:
        assert torch.equal(after[k], kept[k] if on_exceed == "freeze" else init[k]), k
    assert ref.strategy.frozen_step == (2 if on_exceed == "freeze" else None)
    ref.metrics(5.0)
    if on_exceed == "freeze":
        assert update(ref, 3, 0.0) is None  # no check once frozen ...
        assert ref.metrics(None)["ref_to_initial"] == 0.25  # ... but the distances are measured


def test_stable_key_rules_are_one_line():
    from xdpo.errors import ConfigError

    base = ["model.pretrained=x", "data.path=y"]
    with pytest.raises(ConfigError, match="reference.alpha.*not a blend of the weights B A"):
        load_config(None, [*base, "model.lora_rank=4", "reference.strategy=stable", "reference.alpha=0.5"])
    load_config(None, [*base, "model.lora_rank=4", "reference.strategy=stable", "reference.anchor=0.5"])
    with pytest.raises(ConfigError, match="reference.anchor.*stable only"):
        load_config(None, [*base, "reference.strategy=periodic", "reference.anchor=0.1"])


class FixedProcess:
    """A noise process whose x_t is x0 and whose target is 0 (the divergence on fixed tensors)."""

    num_steps = 10

    def noise(self, x0, eps, t):
        return x0, torch.zeros_like(x0)

    def model_timestep(self, t):
        return t


def test_kang_divergence_is_a_hand_computation_on_fixed_tensors():
    """D = T * mean_x (e_candidate(x) - e_initial(x)) (Kang et al. Eq. 8), errors mean over C,H,W."""
    lat = torch.zeros(2, 1, 1, 2)
    cand = torch.tensor([[[[0.3, 0.1]]], [[[0.0, 0.2]]]])  # errors 0.05, 0.02
    init = torch.full((2, 1, 1, 2), 0.1)  # errors 0.01, 0.01
    probe = Probe(lat, {}, FixedProcess(), autocast=torch.no_grad)

    def estimate(estimator):
        return probe.estimate(lambda *a: cand, lambda *a: init, step=1, seed=0, draws=1, chunk=8,
                              estimator=estimator)  # fmt: skip

    d, se = estimate("kang")
    assert d == pytest.approx(10 * (0.04 + 0.01) / 2) and se == pytest.approx(0.15)  # std(0.4, 0.1) / sqrt 2
    assert estimate("error_gap")[0] == pytest.approx(0.025)
    assert estimate("pred_mse")[0] == pytest.approx((0.02 + 0.01) / 2)
    assert estimate("kang")[0] == d  # seeded by (seed, step): the same value


def test_stable_measures_its_guard_and_distances_on_the_probe(unet, tiny_pipeline_dir):
    from xdpo.models.load import load_components
    from xdpo.models.noise import DDPMProcess

    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=y"])
    process = DDPMProcess(load_components(cfg.model, cfg.family).scheduler)
    ref = make(unet, False, strategy="stable", update_every=1, max_divergence=1e9, probe_draws=2)
    assert ref.divergence == "kang" and make(unet, False, strategy="periodic").divergence == "pred_mse"
    lat = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(1))}
    ref.probe = Probe(lat, cond, process, autocast=torch.no_grad)
    perturb(unet, 0.02)

    def on_probe(estimator):
        return ref.probe.estimate(ref.policy_predict, ref.initial_predict, step=1, seed=0, draws=2, chunk=2,
                                  estimator=estimator)[0]  # fmt: skip

    kang, gap, mse = on_probe("kang"), on_probe("error_gap"), on_probe("pred_mse")
    d = ref.maybe_update(1, seed=0, chunk=2)
    assert d == kang == pytest.approx(1000 * gap) and d != 0
    row = ref.metrics(d)
    assert row["ref_to_policy"] == pytest.approx(0.0, abs=1e-12)  # the reference is now the policy
    assert row["ref_to_initial"] == pytest.approx(mse, rel=1e-6) and mse > 0


PERIODIC = {
    "reference.strategy": "periodic",
    "reference.update_every": 2,
    "reference.max_divergence": 1.0,
    "timesteps.sampling": "skewed",
    "timesteps.weighting": "snr",
}
STABLE = {  # a soft update and the anchor (LoRA: the copy and the anchor), Kang's guard far away
    0: {"reference.strategy": "stable", "reference.alpha": 0.5, "reference.anchor": 0.1,
        "reference.max_divergence": 1e6},
    4: {"reference.strategy": "stable", "reference.anchor": 0.1, "reference.max_divergence": 1e6},
}  # fmt: skip


def run(tmp_path, pipe, pairs, name, **overrides):
    """The shared harness (conftest.run_training) with a periodic reference and skewed, SNR-weighted t."""
    return run_training(tmp_path / name, pipe, pairs, **{**PERIODIC, **overrides})


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["periodic", "stable"])
@pytest.mark.parametrize("lora", [0, 4])
def test_moving_reference_run_resumes_exactly(tmp_path, tiny_pipeline_dir, pairs_parquet, lora, strategy):
    """Resume in the middle of a periodic or stable run (after one reference update) reproduces the
    uninterrupted run: losses, D, the reference's distances, the final weights and the reference's."""
    kw = {"model.lora_rank": lora, **(STABLE[lora] if strategy == "stable" else {})}
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
        assert ra.get("ref_to_initial") == rb.get("ref_to_initial")
        assert ra.get("ref_to_policy") == rb.get("ref_to_policy")
    if strategy == "stable":
        assert [r["ref_to_initial"] is not None for r in a] == [False, True, False, True, False]
        assert all(r["ref_to_policy"] > 0 for r in a if r["ref_to_initial"] is not None)  # the anchor lags
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


def test_stable_as_a_copy_with_pred_mse_is_periodic(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """alpha = 1, kappa = 0 and the pred_mse guard: the same run as `periodic`, bit for bit (the shipped
    ablations moved to `stable` keep their numbers)."""
    kw = {"train.max_steps": 4, "reference.max_divergence": 0.1}
    a = metrics(run(tmp_path, tiny_pipeline_dir, pairs_parquet, "periodic", **kw))
    b = metrics(run(tmp_path, tiny_pipeline_dir, pairs_parquet, "stable", **kw, **{
        "reference.strategy": "stable", "reference.divergence": "pred_mse"}))  # fmt: skip
    assert any(r["ref_divergence"] is not None for r in a)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ref_divergence", "ref_updates", "ref_frozen_step", "reward_margin"):
            assert ra[key] == rb[key], key


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


@pytest.mark.slow
def test_fsdp2_stable_soft_update_and_anchor_closed_form(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """FSDP2, 2 processes (the policy sharded): the staged candidate gathers the policy whole; after the first
    update (alpha 0.5, kappa 0.1) the reference is 0.55 initial + 0.45 policy, parameter by parameter."""
    from test_fsdp import FSDP_ENV, launch

    out = tmp_path / "fsdp-stable"
    launch(out, tiny_pipeline_dir, pairs_parquet, "train.max_steps=2", "reference.strategy=stable",
           "reference.alpha=0.5", "reference.anchor=0.1", "reference.max_divergence=1e9", env=FSDP_ENV)  # fmt: skip
    ref = load_file(out / "checkpoints" / "step-2" / "reference.safetensors")
    policy = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet").state_dict()
    init = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").state_dict()
    assert metrics(out)[1]["ref_updates"] == 1
    assert any(not torch.equal(policy[k], init[k]) for k in init)
    for k in init:
        torch.testing.assert_close(ref[k], 0.55 * init[k] + 0.45 * policy[k], rtol=0, atol=1e-6)
