"""Stochastic sampler steps (xdpo.models.sde, xdpo.rollout.stochastic): Flow-GRPO's SDE step and DDIM with
eta > 0 against closed forms and diffusers' schedulers; the engine's recorded transitions."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from xdpo.models.sde import ddim_coefficients, flow_coefficients, log_prob, step_mean
from xdpo.objectives.likelihood import gaussian_kl


def test_flow_sde_step_mean_and_std_are_flow_grpo_eq_12():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for sigma, nxt, a_level in ((0.8, 0.65, 0.7), (0.3, 0.1, 1.0), (1.0, 0.9, 0.7)):
        a, b, std = flow_coefficients(sigma, nxt, 0.9, a_level)
        dt = nxt - sigma
        below = sigma if sigma < 1 else 0.9  # the authors' stand-in for sigma = 1 in 1 - t
        s = a_level * math.sqrt(sigma / (1 - below))
        drift = v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)  # Eq. 12's bracket
        torch.testing.assert_close(step_mean(x, v, a, b), x + drift * dt)
        assert std == pytest.approx(s * math.sqrt(-dt))


def test_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    g = torch.Generator().manual_seed(1)
    mean, nxt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.7])
    want = torch.stack(
        [torch.distributions.Normal(mean[i], std[i]).log_prob(nxt[i]).mean() for i in range(2)]
    )
    torch.testing.assert_close(log_prob(nxt, mean, std), want)
    other = torch.randn(2, 3, 4, 4, generator=g)
    kl = torch.stack(
        [torch.distributions.kl_divergence(torch.distributions.Normal(mean[i], std[i]),
                                           torch.distributions.Normal(other[i], std[i])).mean() for i in range(2)]
    )  # fmt: skip
    torch.testing.assert_close(gaussian_kl(mean, other, std), kl)


def test_flow_sde_at_zero_noise_is_the_euler_schedulers_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 6, 6, generator=g)
        s = sched.sigmas
        a, b, std = flow_coefficients(float(s[i]), float(s[i + 1]), float(s[1]), 0.0)
        want = sched.step(v, t, x, return_dict=False)[0]
        torch.testing.assert_close(step_mean(x, v, a, b), want)
        assert std == 0.0
        x = want


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_coefficients_are_diffusers_ddim_step_mean_and_variance(prediction_type):
    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, beta_schedule="scaled_linear",
                          steps_offset=1)  # fmt: skip
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 6, generator=g)
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    for t in sched.timesteps:
        out = torch.randn(2, 4, 6, 6, generator=g)
        prev = int(t) - step
        abar = float(sched.alphas_cumprod[t])
        abar_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        for eta in (0.0, 1.0, 0.5):
            a, b, std = ddim_coefficients(abar, abar_prev, eta, prediction_type)
            zero = torch.zeros_like(x)
            want = sched.step(out, t, x, eta=eta, variance_noise=zero, return_dict=False)[0]
            torch.testing.assert_close(step_mean(x, out, a, b), want, rtol=1e-5, atol=1e-5)
            var = (
                (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
            )  # DDIM Eq. 16, diffusers' _get_variance
            assert std == pytest.approx(eta * math.sqrt(var))
            noise = torch.randn(x.shape, generator=g)
            drawn = sched.step(out, t, x, eta=eta, variance_noise=noise, return_dict=False)[0]
            torch.testing.assert_close(drawn, step_mean(x, out, a, b) + std * noise, rtol=1e-5, atol=1e-5)
        x = sched.step(out, t, x, return_dict=False)[0]


CASES = {"tiny_pipeline_dir": ("ddim", 5.0), "tiny_sd3_pipeline_dir": ("default", 1.0)}


@pytest.mark.parametrize("fixture", list(CASES))
def test_engine_records_the_trained_steps_and_is_the_ode_without_sde_steps(request, fixture):
    from xdpo.evaluate.pipeline import load_pipeline
    from xdpo.rollout.engine import Job, RolloutEngine
    from xdpo.rollout.stochastic import StochasticPlan

    scheduler, guidance = CASES[fixture]
    pipe = load_pipeline(request.getfixturevalue(fixture), scheduler=scheduler, device="cpu", dtype="fp32")
    jobs = [Job("a red square", 3), Job("a blue circle", 7), Job("a red square", 11)]
    ode = RolloutEngine(pipe, steps=4, guidance=guidance, batch_images=3).sample(jobs)
    none = StochasticPlan(sde=(), record=())
    same = RolloutEngine(pipe, steps=4, guidance=guidance, batch_images=3, stochastic=none).sample(jobs)
    torch.testing.assert_close(same.latents, ode.latents)
    assert same.steps == {} and same.cfg == (guidance if guidance > 1 else None)
    plan = StochasticPlan(sde=(1, 2), record=(2,), noise_level=0.7, eta=1.0)
    got = RolloutEngine(pipe, steps=4, guidance=guidance, batch_images=2, stochastic=plan).sample(jobs)
    one = RolloutEngine(pipe, steps=4, guidance=guidance, batch_images=1, stochastic=plan).sample(jobs)
    torch.testing.assert_close(
        got.latents, one.latents, rtol=1e-3, atol=1e-4
    )  # per-image noise: any batching
    assert not torch.allclose(got.latents, ode.latents, atol=1e-3)
    s = got.steps
    assert s["x"].shape == (3, 1, *ode.latents.shape[1:]) and s["logp"].shape == (3, 1)
    assert s["position"].tolist() == [2] and float(s["std"][0]) > 0
    # the recorded next latent is a draw of the recorded Gaussian: its standardised residual is ~N(0, 1)
    # only given the model's output, so check the recorded log-prob against the recorded pair instead
    assert torch.isfinite(s["logp"]).all()
    assert s["next"].shape == s["x"].shape and not torch.equal(s["next"], s["x"])


def test_stochastic_samplers_are_euler_on_flow_and_ddim_without_clipping_on_ddpm():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from xdpo.errors import ConfigError
    from xdpo.rollout.stochastic import stochastic_inner

    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert stochastic_inner(euler) is euler
    ddim = stochastic_inner(DDPMScheduler(clip_sample=True, prediction_type="v_prediction"))
    assert type(ddim).__name__ == "DDIMScheduler" and not ddim.config.clip_sample
    assert ddim.config.prediction_type == "v_prediction" and not ddim.config.thresholding

    flow_dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(
        ConfigError, match="online.scheduler: stochastic rollouts on flow models use the Euler"
    ):
        stochastic_inner(flow_dpm)


def test_a_deterministic_step_is_never_recorded():
    """DDIM's last step onto abar' = 1 (set_alpha_to_one, a schedule ending at t = 0) has std 0: a trained
    position there is skipped (its log-prob would be infinite), the others are recorded."""
    from diffusers import DDIMScheduler

    from xdpo.rollout.stochastic import StochasticPlan, StochasticScheduler

    inner = DDIMScheduler(set_alpha_to_one=True)
    inner.set_timesteps(4)
    plan = StochasticPlan(sde=(0, 1, 2, 3), record=(0, 1, 2, 3), noise_level=0.7, eta=1.0)
    sched = StochasticScheduler(inner, plan, [torch.Generator().manual_seed(0)])
    x = torch.randn(1, 4, 8, 8)
    for t in inner.timesteps:
        x = sched.step(torch.randn_like(x), t, x, return_dict=False)[0]
    assert [r["position"] for r in sched.records] == [0, 1, 2]
    assert all(r["std"] > 0 and torch.isfinite(r["logp"]).all() for r in sched.records)
