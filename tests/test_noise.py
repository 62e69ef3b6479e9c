"""Noise processes (targets in closed form, conversion to noise predictions) and Flow-DPO's loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from xdpo.models.noise import DDPMProcess, FlowProcess
from xdpo.objectives import preference_loss
from xdpo.train.step import step_weight

SD15 = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
}


def tensors(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    eps = torch.randn(n, 4, 8, 8, generator=g)
    return x0, eps, torch.tensor([0, 250, 600, 999])[:n]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_ddpm_targets_in_closed_form(kind):
    sched = DDPMScheduler(**SD15, prediction_type=kind)
    proc = DDPMProcess(sched)
    x0, eps, t = tensors()
    x_t, target = proc.noise(x0, eps, t)
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    a, b = abar.sqrt().float(), (1 - abar).sqrt().float()
    torch.testing.assert_close(x_t, a * x0 + b * eps)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    expected = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[kind]
    torch.testing.assert_close(target, expected)
    if kind == "v_prediction":
        torch.testing.assert_close(target, sched.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_to_epsilon_recovers_the_noise_from_a_perfect_prediction(kind):
    proc = DDPMProcess(DDPMScheduler(**SD15, prediction_type=kind))
    x0, eps, t = tensors(1)
    x_t, target = proc.noise(x0, eps, t)
    torch.testing.assert_close(proc.to_epsilon(target, x_t, t), eps, rtol=1e-4, atol=1e-4)


def test_v_errors_are_eps_errors_scaled_by_one_over_abar():
    """v - v_hat = (eps - eps_hat) / sqrt(abar): the squared factor is 1 at t = 0 and ~215 at t = 999 (SD)."""
    sched = DDPMScheduler(**SD15, prediction_type="v_prediction")
    proc = DDPMProcess(sched)
    x0, eps, t = tensors(2)
    x_t, v = proc.noise(x0, eps, t)
    v_hat = v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
    e_v = (v_hat - v).pow(2).mean(dim=(1, 2, 3))
    e_eps = (proc.to_epsilon(v_hat, x_t, t) - eps).pow(2).mean(dim=(1, 2, 3))
    ratio = e_v / e_eps
    abar = sched.alphas_cumprod.double()[t]
    torch.testing.assert_close(ratio.double(), 1 / abar, rtol=1e-3, atol=0)
    assert 200 < float(1 / abar[-1]) < 230


def test_flow_noise_and_velocity_target():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    proc = FlowProcess(sched)
    x0, eps, k = tensors(4)
    x_t, target = proc.noise(x0, eps, k)
    s = proc.sigma(k).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(target, eps - x0)
    # the scheduler's own (shifted) training sigmas, ascending
    torch.testing.assert_close(proc.sigmas.float(), sched.sigmas[:1000].flip(0).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(proc.model_timestep(k), s.flatten() * 1000)
    torch.testing.assert_close(proc.to_epsilon(target, x_t, k), eps, rtol=1e-4, atol=1e-4)


def _flow_dpo_transcription(e_w, e_l, r_w, r_l, beta, t):
    """Liu et al. 2025, §4.2: L = -log sigma(-(beta_t / 2) ((||v_w - v_theta||^2 - ||v_w - v_ref||^2)
    - (||v_l - v_theta||^2 - ||v_l - v_ref||^2))), beta_t = beta (1 - t)^2 (or beta for a constant schedule)."""
    beta_t = beta if t is None else beta * (1 - t) ** 2
    inside = (e_w - r_w) - (e_l - r_l)
    return -F.logsigmoid(-(beta_t / 2) * inside)


@pytest.mark.parametrize("schedule", ["constant", "flow"])
def test_flow_dpo_loss_equals_the_papers_formula(schedule):
    g = torch.Generator().manual_seed(5)
    e_w, e_l, r_w, r_l = (torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    proc = FlowProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    k = torch.tensor([0, 100, 400, 700, 900, 999])
    m = SimpleNamespace(lambda_table=None, beta_schedule=schedule, process=proc)
    weight = step_weight(m, k)
    out = preference_loss(e_w, e_l, r_w, r_l, beta=500.0, weight=weight)
    s = proc.sigma(k)
    expected = _flow_dpo_transcription(e_w, e_l, r_w, r_l, 500.0, s if schedule == "flow" else None)
    torch.testing.assert_close(out.loss, expected)


def snr_table(process):
    """The `timesteps.weighting=snr` table a run builds for `process`."""
    from xdpo.train.setup import lambda_table

    return lambda_table(SimpleNamespace(timesteps=SimpleNamespace(weighting="snr")), process)


def test_snr_weighting_moves_flow_models():
    """On flow models lambda = 1 + minmax(sigma) (docs/math.md §7): 1/sqrt(SNR) = sigma / (1 - sigma) diverges
    at sigma = 1, and its min-max was ~1 everywhere but at the last index (E lambda = 1.005 under SD3's
    logit-normal sampling). Now lambda runs from 1 to 2, is monotone, and moves beta on most draws."""
    from xdpo.objectives.timesteps import sample_timesteps

    proc = FlowProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    table = snr_table(proc)
    s = proc.sigmas
    torch.testing.assert_close(table, (1 + (s - s.min()) / (s.max() - s.min())).float())
    assert table[0] == 1 and table[-1] == 2 and bool((table[1:] >= table[:-1]).all())
    t = sample_timesteps(20000, 1000, sampling="logit_normal", generator=torch.Generator().manual_seed(0))
    lam = table[t]
    assert lam.mean() > 1.5 and (lam > 1.1).float().mean() > 0.9


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_zero_terminal_snr_schedule_has_finite_weights(kind):
    """A zero-terminal-SNR schedule (abar_T = 0, Lin et al. 2024) gave lambda(T) = NaN (and NaN losses); abar
    is clamped to 2^-24 as diffusers' schedulers do, so SNR > 0 and lambda runs from 1 to 2."""
    sched = DDPMScheduler(**SD15, prediction_type=kind, rescale_betas_zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) < 1e-12
    proc = DDPMProcess(sched)
    assert bool(torch.isfinite(proc.snr()).all() and (proc.snr() > 0).all())
    table = snr_table(proc)
    assert bool(torch.isfinite(table).all()) and table[0] == 1 and table[-1] == 2
    assert bool((table[1:] >= table[:-1]).all())
    x0, eps, k = tensors()
    x_t, target = proc.noise(x0, eps, k)
    assert bool(torch.isfinite(x_t).all() and torch.isfinite(target).all())


FLOW_OPTIONS = [  # scheduler options that shape the sigmas, as FlowMatchEulerDiscreteScheduler applies them
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    {"use_dynamic_shifting": True, "shift_terminal": 0.1},
    {"shift": 3.0, "shift_terminal": 0.05},
]


@pytest.mark.parametrize("options", FLOW_OPTIONS, ids=["linear-shift", "dynamic-terminal", "terminal"])
def test_flow_sigmas_follow_the_schedulers_shift_options(options):
    """`time_shift_type=linear` and `shift_terminal` were ignored: the training sigmas are those the scheduler
    samples with num_train_timesteps steps (`set_timesteps`, diffusers' own code) at the training resolution."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **options)
    seq_len, n = 1024, 1000
    proc = FlowProcess(sched, image_seq_len=seq_len)
    c = sched.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu if c.use_dynamic_shifting else None)
    torch.testing.assert_close(proc.sigmas.flip(0).float(), sched.sigmas[:n], rtol=1e-5, atol=1e-6)


def test_inverted_flow_sigmas_are_refused():
    from xdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="invert_sigmas") as err:
        FlowProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, invert_sigmas=True))
    assert "\n" not in str(err.value)
